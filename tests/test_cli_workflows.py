"""The CLI finishes what a user starts: readable failures, no silent empty stores, sync
that says when it cannot deliver, the whole task and conflict workflow, a demo that
reports as it goes, and docs that hold the contract they cite (issue 15, items 11-18).

Commands run as real child processes (``python -m clinik_local.cli``) on real files;
sync talks to a real reference server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clinik_local import ReferenceServer, SyncConfig, TaskStore, __version__
from clinik_local.cli import EXIT_CODES
from clinik_local.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
LAB_ORDER = {"status": "requested", "intent": "order", "patientId": "pt_1"}


def run_cli(
    *args: str,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "CLINIK_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "clinik_local.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        # PYTHONPATH: the child runs this tree's clinik_local, whatever its working directory
        env={**base, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "error", **(env or {})},
    )


def assert_fails_in_one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The failure is the documented code and exactly one readable stderr line."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, result.stderr
    assert lines[0].startswith("clinik-local"), lines[0]
    return lines[0]


def store_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(path.name + "*"))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "clinic.db"


@pytest.fixture
def store_with_task(db: Path) -> tuple[Path, str]:
    with TaskStore.open(db) as store:
        task_id = store.tasks.create(LAB_ORDER).data.id
    assert task_id is not None
    return db, task_id


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(host="127.0.0.1", port=0) as running:
        yield running


def refused_port() -> int:
    """A 127.0.0.1 port that refuses connections (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- item 12: every failure is one line and its documented code ----------------------


def test_help_documents_every_exit_code() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    section = result.stdout.split("exit codes:", 1)[1]
    for code, _ in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s", section, re.M), f"exit code {code} not in --help"


def test_import_of_a_missing_file_is_one_line_exit_3_and_creates_no_store(
    tmp_path: Path, db: Path
) -> None:
    result = run_cli("import", "--db", str(db), str(tmp_path / "nothere.ndjson"))
    line = assert_fails_in_one_line(result, 3)
    assert "nothere.ndjson" in line
    assert store_files(db) == []


def test_import_of_a_non_utf8_file_names_the_line_and_exits_2(tmp_path: Path, db: Path) -> None:
    source = tmp_path / "latin1.ndjson"
    source.write_bytes(b'{"status": "draft", "intent": "plan"}\n{"note": "caf\xe9"}\n')
    line = assert_fails_in_one_line(run_cli("import", "--db", str(db), str(source)), 2)
    assert "line 2" in line
    assert "UTF-8" in line


def test_export_into_a_missing_directory_is_one_line_and_exit_4(
    store_with_task: tuple[Path, str], tmp_path: Path
) -> None:
    db, _ = store_with_task
    target = tmp_path / "no" / "such" / "dir" / "tasks.ndjson"
    line = assert_fails_in_one_line(run_cli("export", "--db", str(db), "--out", str(target)), 4)
    assert "does not exist" in line


def test_serve_on_a_busy_port_is_one_line_and_exit_4() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port), env={"CLINIK_TOKEN": "t"}, timeout=60)
    line = assert_fails_in_one_line(result, 4)
    assert f"127.0.0.1:{port}" in line


@pytest.mark.parametrize("port", ["99999", "-1", "eighty"])
def test_serve_with_a_port_out_of_range_is_one_line_and_exit_2(port: str) -> None:
    line = assert_fails_in_one_line(run_cli("serve", "--port", port), 2)
    assert "--port" in line


def test_an_unknown_option_is_one_line_and_exit_2(db: Path) -> None:
    line = assert_fails_in_one_line(run_cli("check", "--db", str(db), "--colour"), 2)
    assert "--colour" in line


# --- item 11 (CLI part): exported NDJSON is private like the store --------------------


def test_export_creates_its_file_0600_and_leaves_nothing_partial(
    store_with_task: tuple[Path, str], tmp_path: Path
) -> None:
    db, _ = store_with_task
    target = tmp_path / "tasks.ndjson"
    result = run_cli("export", "--db", str(db), "--out", str(target))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(target.read_text(encoding="utf-8").splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if "ndjson" in p.name) == ["tasks.ndjson"]


# --- item 13: a mistyped --db is refused, a failed create/import leaves no file -------


@pytest.mark.parametrize(
    "command",
    [
        ["export"],
        ["check"],
        ["tasks", "get", "task_1"],
        ["tasks", "search"],
        ["tasks", "history", "task_1"],
        ["tasks", "delete", "task_1"],
        ["sync", "status"],
        ["sync", "dead-letters"],
        ["sync", "conflicts"],
    ],
    ids=" ".join,
)
def test_commands_that_read_refuse_a_missing_store_and_create_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    typo = tmp_path / "clinc.db"
    line = assert_fails_in_one_line(run_cli(*command, "--db", str(typo)), 3)
    assert str(typo) in line
    assert "does not exist" in line
    assert list(tmp_path.iterdir()) == []


def test_sync_run_refuses_a_missing_store(tmp_path: Path, server: ReferenceServer) -> None:
    typo = tmp_path / "clinc.db"
    result = run_cli(
        "sync", "run", "--db", str(typo), "--url", server.url, env={"CLINIK_TOKEN": server.token}
    )
    assert_fails_in_one_line(result, 3)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_import_into_a_new_file_removes_the_file(tmp_path: Path, db: Path) -> None:
    source = tmp_path / "tasks.ndjson"
    good = json.dumps({"status": "draft", "intent": "plan"})
    source.write_text("\n".join([good] * 1500 + ['{"status": "nope"}']) + "\n", encoding="utf-8")
    result = run_cli("import", "--db", str(db), str(source))
    assert_fails_in_one_line(result, 2)
    assert store_files(db) == []


def test_a_failed_import_into_an_existing_store_keeps_the_store(
    store_with_task: tuple[Path, str], tmp_path: Path
) -> None:
    db, task_id = store_with_task
    source = tmp_path / "tasks.ndjson"
    source.write_text('{"status": "nope"}\n', encoding="utf-8")
    assert_fails_in_one_line(run_cli("import", "--db", str(db), str(source)), 2)
    with TaskStore.open(db) as store:
        assert store.tasks.get(task_id).data.patient_id == "pt_1"


def test_a_failed_create_into_a_new_file_removes_the_file(db: Path) -> None:
    result = run_cli("tasks", "create", "--db", str(db), "--data", '{"status": "nope"}')
    assert_fails_in_one_line(result, 2)
    assert store_files(db) == []


# --- item 14: sync run says when it cannot deliver, and exits non-zero ----------------


def test_sync_run_with_the_service_down_stops_after_the_first_failed_connect(db: Path) -> None:
    with TaskStore.open(db) as store:
        store.tasks.create(LAB_ORDER)
    url = f"http://127.0.0.1:{refused_port()}/api/v1"
    # The default --wait is 300 s; the 60 s child timeout fails the old behaviour.
    result = run_cli(
        "sync", "run", "--db", str(db), "--url", url, env={"CLINIK_TOKEN": "t"}, timeout=60
    )
    line = assert_fails_in_one_line(result, 6)
    assert "unreachable" in line
    assert "1 change stay" in line
    assert json.loads(result.stdout)["status"]["state"] == "offline"
    with TaskStore.open(db) as store:
        assert store.tasks.count().data == 1


def test_sync_run_with_wait_online_reports_offline_then_gives_up_at_wait(db: Path) -> None:
    with TaskStore.open(db) as store:
        store.tasks.create(LAB_ORDER)
    url = f"http://127.0.0.1:{refused_port()}/api/v1"
    result = run_cli(
        "sync",
        "run",
        "--db",
        str(db),
        "--url",
        url,
        "--wait",
        "1",
        "--wait-online",
        env={"CLINIK_TOKEN": "t"},
        timeout=60,
    )
    assert result.returncode == 6, result.stderr
    assert "Traceback" not in result.stderr
    assert "sync: offline" in result.stderr
    assert "still unreachable after --wait 1 s" in result.stderr


def test_sync_run_delivers_and_exits_0(
    store_with_task: tuple[Path, str], server: ReferenceServer
) -> None:
    db, task_id = store_with_task
    result = run_cli(
        "sync", "run", "--db", str(db), "--url", server.url, "--json",
        env={"CLINIK_TOKEN": server.token},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["flushed"] is True
    assert task_id in server.tasks()


def test_sync_run_exits_7_and_counts_dead_letters_that_remain(
    store_with_task: tuple[Path, str], server: ReferenceServer
) -> None:
    db, task_id = store_with_task
    server.put_task({"id": task_id, "status": "draft", "intent": "plan"})  # the id is taken
    env = {"CLINIK_TOKEN": server.token}
    result = run_cli("sync", "run", "--db", str(db), "--url", server.url, env=env)
    line = assert_fails_in_one_line(result, 7)
    assert "1 dead letter and 0 conflicts remain" in line
    letters = json.loads(run_cli("sync", "dead-letters", "--db", str(db), "--json").stdout)
    assert [d["task_id"] for d in letters] == [task_id]
    assert letters[0]["status"] == 409


def test_sync_run_without_the_token_variable_names_it(store_with_task: tuple[Path, str]) -> None:
    db, _ = store_with_task
    result = run_cli("sync", "run", "--db", str(db), "--url", "http://127.0.0.1:9/api/v1")
    line = assert_fails_in_one_line(result, 5)
    assert "CLINIK_TOKEN" in line
    other = run_cli(
        "sync", "run", "--db", str(db), "--url", "http://127.0.0.1:9/api/v1",
        "--token-env", "MY_CLINIC_TOKEN",
    )  # fmt: skip
    assert "MY_CLINIC_TOKEN" in assert_fails_in_one_line(other, 5)


# --- item 16: the workflows the CLI starts, it can finish -----------------------------


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"clinik-local {__version__}"


@pytest.mark.parametrize("action", ["create", "get"])
def test_tasks_create_and_get_without_json_print_valid_json_with_the_sync_state(
    db: Path, action: str
) -> None:
    created = run_cli("tasks", "create", "--db", str(db), "--data", json.dumps(LAB_ORDER))
    assert created.returncode == 0, created.stderr
    result = created
    if action == "get":
        task_id = json.loads(created.stdout)["data"]["id"]
        result = run_cli("tasks", "get", task_id, "--db", str(db))
    envelope = json.loads(result.stdout)
    assert envelope["data"]["patientId"] == "pt_1"
    assert envelope["meta"]["syncState"] == "pending"


def test_tasks_update_delete_and_history_with_if_match(store_with_task: tuple[Path, str]) -> None:
    db, task_id = store_with_task
    changes = json.dumps({"status": "accepted", "note": "Called the lab."})
    stale = run_cli(
        "tasks", "update", task_id, "--db", str(db), "--data", changes, "--if-match", "7"
    )
    assert "versionId" in assert_fails_in_one_line(stale, 2)
    updated = run_cli(
        "tasks", "update", task_id, "--db", str(db), "--data", changes, "--if-match", "1", "--json"
    )
    assert updated.returncode == 0, updated.stderr
    task = json.loads(updated.stdout)["data"]
    assert (task["status"], task["note"], task["versionId"]) == ("accepted", "Called the lab.", "2")
    # changes from stdin; null clears a field
    cleared = run_cli("tasks", "update", task_id, "--db", str(db), stdin='{"note": null}')
    assert cleared.returncode == 0, cleared.stderr
    assert "note" not in json.loads(cleared.stdout)["data"]

    deleted = run_cli("tasks", "delete", task_id, "--db", str(db), "--if-match", "3", "--json")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["data"] == {"id": task_id, "deleted": True}
    assert run_cli("tasks", "get", task_id, "--db", str(db)).returncode == 3

    history = run_cli("tasks", "history", task_id, "--db", str(db), "--json")
    assert history.returncode == 0, history.stderr
    ops = [(v["version"], v["op"]) for v in json.loads(history.stdout)["data"]]
    assert ops == [(1, "create"), (2, "update"), (3, "update"), (4, "delete")]
    table = run_cli("tasks", "history", task_id, "--db", str(db)).stdout.splitlines()
    assert [line.split()[1] for line in table] == ["create", "update", "update", "delete"]


def test_a_sync_conflict_is_listed_and_resolved_from_the_cli(
    store_with_task: tuple[Path, str], server: ReferenceServer
) -> None:
    db, task_id = store_with_task
    env = {"CLINIK_TOKEN": server.token}
    sync = ("sync", "run", "--db", str(db), "--url", server.url)
    assert run_cli(*sync, env=env).returncode == 0
    remote = server.get(task_id)
    server.put_task({**remote, "note": "changed at the clinic"})  # the server moves on
    update = run_cli("tasks", "update", task_id, "--db", str(db), "--data", '{"note": "local"}')
    assert update.returncode == 0, update.stderr

    line = assert_fails_in_one_line(run_cli(*sync, env=env), 7)
    assert "1 conflict remain" in line
    conflicts = json.loads(run_cli("sync", "conflicts", "--db", str(db), "--json").stdout)
    assert [c["task_id"] for c in conflicts] == [task_id]
    assert conflicts[0]["server"]["note"] == "changed at the clinic"

    both = run_cli("sync", "resolve", task_id, "--db", str(db), "--keep", "local", "--merged", "{}")
    assert_fails_in_one_line(both, 2)
    merged = json.dumps({**LAB_ORDER, "note": "local, and changed at the clinic"})
    resolved = run_cli("sync", "resolve", task_id, "--db", str(db), "--merged", merged, "--json")
    assert resolved.returncode == 0, resolved.stderr
    assert json.loads(resolved.stdout)["kept"] == "merged"
    assert run_cli(*sync, env=env).returncode == 0
    assert server.get(task_id)["note"] == "local, and changed at the clinic"
    status = json.loads(run_cli("sync", "status", "--db", str(db), "--json").stdout)
    assert status == {"pending": 0, "in_flight": 0, "dead": 0, "conflicts": 0}


def test_sync_status_reads_the_store_without_url_or_token(
    store_with_task: tuple[Path, str],
) -> None:
    db, _ = store_with_task
    result = run_cli("sync", "status", "--db", str(db), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pending"] == 1
    # scripts written when every sync command demanded --url keep working
    old_style = run_cli("sync", "status", "--db", str(db), "--url", "https://clinic-host/api/v1")
    assert old_style.returncode == 0, old_style.stderr


def test_plain_http_refusal_names_the_cli_flag_and_the_flag_allows_it(
    store_with_task: tuple[Path, str], server: ReferenceServer
) -> None:
    db, _ = store_with_task
    env = {"CLINIK_TOKEN": server.token}
    # 127.1 is 127.0.0.1, but not a name the loopback check recognises.
    url = f"http://127.1:{server.port}/api/v1"
    refused = run_cli("sync", "run", "--db", str(db), "--url", url, env=env)
    line = assert_fails_in_one_line(refused, 2)
    assert "--allow-insecure-http" in line
    assert "allow_insecure_http=True" not in line
    allowed = run_cli(
        "sync", "run", "--db", str(db), "--url", url, "--allow-insecure-http", env=env
    )
    assert allowed.returncode == 0, allowed.stderr


def test_an_unusable_ca_bundle_is_named_by_its_flag(
    store_with_task: tuple[Path, str], tmp_path: Path
) -> None:
    db, _ = store_with_task
    for bundle in (tmp_path / "missing.pem", db):
        result = run_cli(
            "sync", "run", "--db", str(db), "--url", "https://127.0.0.1:9/api/v1",
            "--ca-bundle", str(bundle), env={"CLINIK_TOKEN": "t"},
        )  # fmt: skip
        assert "--ca-bundle" in assert_fails_in_one_line(result, 2)


def test_format_names_are_case_insensitive(
    store_with_task: tuple[Path, str], tmp_path: Path
) -> None:
    db, _ = store_with_task
    dump = tmp_path / "tasks.ndjson"
    exported = run_cli("export", "--db", str(db), "--format", "r4", "--out", str(dump))
    assert exported.returncode == 0, exported.stderr
    assert json.loads(dump.read_text(encoding="utf-8"))["resourceType"] == "Task"
    target = tmp_path / "copy.db"
    imported = run_cli("import", "--db", str(target), "--format", "R4", str(dump), "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == {"imported": 1}
    assert "unknown format" in assert_fails_in_one_line(
        run_cli("export", "--db", str(db), "--format", "r6"), 2
    )


def test_limit_and_cursor_may_be_given_as_filters_but_not_twice(db: Path) -> None:
    with TaskStore.open(db) as store:
        store.tasks.create_many([LAB_ORDER] * 3)
    page = run_cli("tasks", "search", "--db", str(db), "--json", "limit=2", "patientId=pt_1")
    assert page.returncode == 0, page.stderr
    first = json.loads(page.stdout)
    assert len(first["data"]) == 2
    rest = run_cli(
        "tasks",
        "search",
        "--db",
        str(db),
        "--json",
        "patientId=pt_1",
        f"cursor={first['meta']['nextCursor']}",
    )
    assert len(json.loads(rest.stdout)["data"]) == 1
    twice = run_cli("tasks", "search", "--db", str(db), "limit=2", "--limit", "3")
    line = assert_fails_in_one_line(twice, 2)
    assert "--limit" in line
    assert "limit=" in line


def test_importing_a_file_of_the_wrong_format_prints_a_short_line_with_a_hint(
    tmp_path: Path,
) -> None:
    source = tmp_path / "a.db"
    with TaskStore.open(source) as store:
        store.tasks.create_many([{**LAB_ORDER, "note": "n" * 200, "code": "lab-order"}] * 3000)
    dump = tmp_path / "tasks.r4.ndjson"
    assert (
        run_cli("export", "--db", str(source), "--format", "R4", "--out", str(dump)).returncode == 0
    )
    result = run_cli("import", "--db", str(tmp_path / "b.db"), str(dump))
    line = assert_fails_in_one_line(result, 2)
    assert len(result.stderr) < 2_000
    assert re.search(r"and [\d,]+ more$", line)
    assert "--format R4" in line
    as_json = run_cli("import", "--db", str(tmp_path / "b.db"), str(dump), "--json")
    error = json.loads(as_json.stderr)
    assert len(error["fields"]) == 50
    assert error["moreFields"] > 0


# --- item 17: the demo ----------------------------------------------------------------


def test_demo_runs_on_a_file_in_the_working_directory_replaced_on_each_run(tmp_path: Path) -> None:
    for _ in range(2):
        result = run_cli("demo", "--tasks", "300", "--sync-changes", "40", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        demo_db = tmp_path / "clinik-demo.db"
        assert str(demo_db) in result.stdout
        with TaskStore.open(demo_db) as store:
            assert store.tasks.count().data == 301  # not 602: the second run replaced it


def test_demo_names_the_store_each_outbox_number_is_about(tmp_path: Path) -> None:
    result = run_cli("demo", "--tasks", "300", "--sync-changes", "40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    about_sync = [
        line for line in result.stdout.splitlines() if "pending" in line or "outbox" in line
    ]
    assert about_sync, result.stdout
    for line in about_sync:
        assert "local store" in line or "sync store" in line, line
    assert "local store clinik-demo.db: tasks 301" in result.stdout
    assert "outbox 301 changes waiting for sync" in result.stdout
    assert "sync store: outbox after sync" in result.stdout


def test_demo_prints_each_step_before_the_next_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clinik_local import demo

    out = io.StringIO()  # not a terminal
    printed_before_bulk: list[str] = []
    real = demo.generate_requests

    def spy(count: int, seed: int = 7) -> Iterator[dict[str, object]]:
        printed_before_bulk.append(out.getvalue())
        yield from real(count, seed)

    monkeypatch.setattr(demo, "generate_requests", spy)
    assert demo.run_demo(str(tmp_path / "d.db"), tasks=50, out=out, sync_changes=0) == 0
    assert "create the seed's lab order" in printed_before_bulk[0]
    assert "get it back by id" in printed_before_bulk[0]


def test_progress_prints_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import itertools
    import time

    clock = itertools.count()  # each reading of the clock is one second later
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    stream = io.StringIO()
    with Progress("importing", 40, stream=stream) as bar:
        for _ in range(8):
            bar.advance(5)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("importing: ")
    assert lines[-1].startswith("importing: 40 of 40 in ")
    assert "\r" not in stream.getvalue()


def test_progress_off_a_terminal_is_silent_for_quick_work() -> None:
    stream = io.StringIO()
    with Progress("exporting", 3, stream=stream) as bar:
        bar.advance(3)
    assert stream.getvalue() == ""


# --- item 18: the contract and the field reference are in the project -----------------


def test_the_docs_hold_the_contract_and_the_field_reference_and_test_docs_runs_them() -> None:
    from tests.test_docs import PAGES

    protocol = ROOT / "docs" / "sync-protocol.md"
    fields = ROOT / "docs" / "seed-api.md"
    assert protocol in PAGES
    assert fields in PAGES
    text = protocol.read_text(encoding="utf-8")
    for part in (
        "## Writes",
        "## Reads",
        "## Pull: the change log",
        "## Bootstrap",
        "GET /tasks/changes",
        "meta.changesCursor",
        "cursor_expired",
        "Idempotency-Key",
    ):
        assert part in text, part
    assert "| status | string | yes |" in fields.read_text(encoding="utf-8")


_LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")
_MD_NAME = re.compile(r"`(?:docs/)?(?P<name>[\w-]+\.md)`")


def test_every_doc_link_and_cited_page_is_in_the_project() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    sources = pages + sorted((ROOT / "clinik_local").glob("*.py"))
    problems = []
    for page in pages:
        for match in _LINK.finditer(page.read_text(encoding="utf-8")):
            target = match.group("target")
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (page.parent / target).exists():
                problems.append(f"{page.relative_to(ROOT)}: link to {target}")
    for source in sources:
        for match in _MD_NAME.finditer(source.read_text(encoding="utf-8")):
            name = match.group("name")
            if not ((ROOT / name).exists() or (ROOT / "docs" / name).exists()):
                problems.append(f"{source.relative_to(ROOT)}: cites {name}")
    assert problems == []


# --- issue 12 item 9: one sync engine per file, "flushed" only when nothing is parked --------


def test_sync_run_says_flushed_false_while_dead_letters_remain(
    store_with_task: tuple[Path, str], server: ReferenceServer
) -> None:
    db, task_id = store_with_task
    server.faults.reject_ids = {task_id}
    env = {"CLINIK_TOKEN": server.token}
    result = run_cli("sync", "run", "--db", str(db), "--url", server.url, "--json", env=env)
    assert result.returncode == 7, result.stderr
    assert json.loads(result.stdout)["flushed"] is False  # a change is parked: not flushed


def test_sync_run_while_the_apps_engine_runs_on_the_file_exits_5_naming_it(
    store_with_task: tuple[Path, str], server: ReferenceServer
) -> None:
    db, task_id = store_with_task
    env = {"CLINIK_TOKEN": server.token}
    app = TaskStore.open(db, sync=SyncConfig(base_url=server.url, token_provider=lambda: "bad"))
    try:
        app.sync.start()  # the app's worker holds the lease (paused: its token is refused)
        deadline = time.monotonic() + 10
        while app.sync.status().state != "auth_required":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        result = run_cli("sync", "run", "--db", str(db), "--url", server.url, env=env)
        line = assert_fails_in_one_line(result, 5)
        assert "another sync engine holds this store" in line
        assert f"process {os.getpid()}" in line
        assert task_id not in server.tasks()
    finally:
        app.close()  # the lease is released with the store
    result = run_cli("sync", "run", "--db", str(db), "--url", server.url, env=env)
    assert result.returncode == 0, result.stderr
    assert task_id in server.tasks()


def test_sync_run_while_another_process_syncs_the_store_names_it_in_one_line(
    store_with_task: tuple[Path, str], server: ReferenceServer
) -> None:
    from tests.test_sync_defects import child_holding_the_lease

    db, task_id = store_with_task
    child = child_holding_the_lease(db, server)
    env = {"CLINIK_TOKEN": server.token}
    try:
        result = run_cli("sync", "run", "--db", str(db), "--url", server.url, env=env)
        line = assert_fails_in_one_line(result, 5)
        assert f"process {child.pid}" in line
        assert "another sync engine" in line
        assert task_id not in server.tasks()
    finally:
        child.kill()
        child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    result = run_cli("sync", "run", "--db", str(db), "--url", server.url, env=env)
    assert result.returncode == 0, result.stderr
    assert task_id in server.tasks()
