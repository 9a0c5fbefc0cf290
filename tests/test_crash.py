"""A real child process writing to a file is SIGKILLed at random moments; nothing is lost.

Each trial is seeded (the child's mix of creates, updates, deletes and batches, and the
number of reported writes after which it is killed, come from the seed; the exact kill
instant is wherever the child happens to be). The checks are in
:func:`tests.crash_child.check_store`: integrity_check ok, every reported write present
exactly, no half-written task, history and outbox one row per change, store writable.
``CLINIK_CRASH_SEED`` replays another series; ``benchmarks/soak_crash.py`` runs hundreds.
"""

from __future__ import annotations

import os
from pathlib import Path

import apsw
import pytest

from tests.crash_child import Reported, check_store, run_trial

TRIALS = 20
SEED = int(os.environ.get("CLINIK_CRASH_SEED", "7000"))


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkilled_writer_loses_no_reported_write_and_leaves_no_half_written_task(
    tmp_path: Path, trial: int
) -> None:
    result = run_trial(tmp_path / "crash.db", SEED + trial)
    assert result.problems == [], f"seed {result.seed}: {result.problems}"
    assert result.tasks >= 0


def test_crash_trials_kill_the_child_mid_stream_with_writes_reported(tmp_path: Path) -> None:
    # A seed whose threshold is well above zero: the child had reported writes when killed.
    results = [run_trial(tmp_path / f"c{n}.db", SEED + 100 + n, max_writes=60) for n in range(3)]
    assert all(r.problems == [] for r in results), [r.problems for r in results]
    assert sum(r.writes for r in results) > 0


def test_crash_check_finds_a_lost_write_and_a_half_written_task(tmp_path: Path) -> None:
    """The checker itself can fail: a reported write missing from the file, and a
    history row without its outbox row, are both reported."""
    path = tmp_path / "crash.db"
    result = run_trial(path, SEED, max_writes=30)
    assert result.problems == []
    ghost = {"id": "ghost", "status": "draft", "intent": "order", "versionId": "1"}
    problems, _ = check_store(path, Reported({"ghost": ghost}, {}, None, 1))
    assert any("ghost" in p for p in problems)
    conn = apsw.Connection(str(path))
    conn.execute("DELETE FROM outbox WHERE seq = (SELECT max(seq) FROM outbox)")
    conn.close()
    problems, _ = check_store(path, Reported({}, {}, None, 0))
    assert any("outbox" in p for p in problems)
