"""The clinik-local command line, end to end in a subprocess on a real file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinik_local import TaskStore


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clinik_local.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "clinic.db")


def test_tasks_create_get_search_round_trip_through_json(db: str) -> None:
    created = run_cli(
        "tasks",
        "create",
        "--db",
        db,
        "--json",
        stdin=json.dumps({"status": "requested", "intent": "order", "patientId": "pt_1"}),
    )
    assert created.returncode == 0, created.stderr
    task = json.loads(created.stdout)["data"]
    assert task["patientId"] == "pt_1"
    assert json.loads(created.stdout)["meta"]["syncState"] == "pending"

    got = run_cli("tasks", "get", task["id"], "--db", db, "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["data"] == task

    found = run_cli(
        "tasks", "search", "--db", db, "--json", "status=requested,ready", "patientId=pt_1"
    )
    assert found.returncode == 0, found.stderr
    page = json.loads(found.stdout)
    assert [t["id"] for t in page["data"]] == [task["id"]]
    assert page["meta"]["hasMore"] is False


def test_tasks_create_accepts_a_json_array_all_or_nothing(db: str) -> None:
    good = {"status": "draft", "intent": "plan"}
    bad = run_cli(
        "tasks", "create", "--db", db, "--json", stdin=json.dumps([good, {"status": "x"}])
    )
    assert bad.returncode == 2
    error = json.loads(bad.stderr)
    assert {f["path"] for f in error["fields"]} == {"[1].status", "[1].intent"}
    ok = run_cli("tasks", "create", "--db", db, stdin=json.dumps([good, good]))
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.split()) == 2
    check = run_cli("check", "--db", db, "--json")
    assert json.loads(check.stdout)["tables"]["tasks"] == 2


def test_bad_input_exits_2_and_names_the_field(db: str) -> None:
    result = run_cli(
        "tasks", "create", "--db", db, "--data", '{"status": "done", "intent": "order"}'
    )
    assert result.returncode == 2
    assert "status" in result.stderr
    assert "allowed:" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_filter_is_refused_with_exit_2(db: str) -> None:
    TaskStore.open(db).close()  # read commands refuse a missing store (exit 3)
    result = run_cli("tasks", "search", "--db", db, "colour=red")
    assert result.returncode == 2
    assert "colour" in result.stderr


def test_missing_task_exits_3(db: str) -> None:
    TaskStore.open(db).close()  # an existing store without that task
    result = run_cli("tasks", "get", "task_missing", "--db", db)
    assert result.returncode == 3
    assert "task_missing" in result.stderr


def test_check_refuses_a_foreign_file_with_exit_4_and_leaves_it_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.txt"
    foreign.write_bytes(b"not a database at all\n" * 50)
    before = foreign.read_bytes()
    result = run_cli("check", "--db", str(foreign))
    assert result.returncode == 4
    assert "not a SQLite database" in result.stderr
    assert foreign.read_bytes() == before


def test_check_reports_integrity_schema_and_outbox(db: str) -> None:
    run_cli("tasks", "create", "--db", db, "--data", '{"status": "ready", "intent": "order"}')
    result = run_cli("check", "--db", db, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["integrity"] == "ok"
    assert report["schemaVersion"] >= 1
    assert report["outbox"]["byState"] == {"pending": 1}


def test_demo_runs_small_and_reports_each_search(tmp_path: Path) -> None:
    result = run_cli("demo", "--tasks", "300", "--db", str(tmp_path / "demo.db"))
    assert result.returncode == 0, result.stderr
    for name in ("patientId", "ownerId", "requesterId", "status", "priority", "code"):
        assert f"search {name}" in result.stdout
    assert "local store " in result.stdout
    assert "outbox 301 changes waiting for sync" in result.stdout


def test_help_shows_examples() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout


@pytest.mark.parametrize("fmt", ["wire", "R4", "R5"])
def test_export_then_import_round_trips_every_task(tmp_path: Path, fmt: str) -> None:
    source, target = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    dump = tmp_path / "tasks.ndjson"
    assert run_cli("demo", "--db", source, "--tasks", "200", "--sync-changes", "0").returncode == 0
    exported = run_cli("export", "--db", source, "--format", fmt, "--out", str(dump))
    assert exported.returncode == 0, exported.stderr
    assert len(dump.read_text().splitlines()) == 201
    imported = run_cli("import", "--db", target, "--format", fmt, str(dump), "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == {"imported": 201}

    def wire_tasks(db: str) -> dict[str, dict[str, object]]:
        out = run_cli("export", "--db", db).stdout.splitlines()
        return {
            task["id"]: {k: v for k, v in task.items() if k not in ("versionId", "lastModified")}
            for task in map(json.loads, out)
        }

    assert wire_tasks(source) == wire_tasks(target)
