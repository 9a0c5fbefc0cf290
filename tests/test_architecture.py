"""The layers hold: imports point down, no cycles, no private names across modules, and
the seams (connection pipeline, Remote, local edit vs server copy) do what they promise.

The import graph is read with ``ast`` from the source, counting imports inside
functions too (a cycle hidden in ``__init__`` is still a cycle); imports under
``if TYPE_CHECKING:`` do not run and do not count. docs/architecture.md draws the
layers this file pins.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest

import clinik_local
from clinik_local import StorageError, TaskExistsError, TaskStore
from clinik_local.aio import AsyncTasksResource
from clinik_local.remotes.base import (
    AuthFailed,
    Change,
    Conflict,
    Delivered,
    PushOutcome,
    Refused,
    Transient,
    Unreachable,
)
from clinik_local.remotes.clinik import ClinikRemote
from clinik_local.storage import connection
from clinik_local.sync import SyncConfig
from clinik_local.tasks import TasksResource

PACKAGE = Path(clinik_local.__file__).resolve().parent

#: Layer of each module, lowest first. A module may import its own group and lower
#: ranks only; groups of the same rank (storage/remotes, tasks/sync) never import
#: each other.
RANKS = {"core": 0, "storage": 1, "remotes": 1, "tasks": 2, "sync": 2, "store": 3, "tools": 4}
CORE = {
    "errors",
    "timestamps",
    "ids",
    "model",
    "lifecycle",
    "wire",
    "codec",
    "search",
    "fhir",
    "merge",
    "derive",
    "events",
}
TOOLS = {"aio", "cli", "demo", "progress", "server", "pytest_plugin", "testing", ""}


def group_of(module: str) -> str:
    """The layer group of ``clinik_local.x.y`` (``""`` is the package itself)."""
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    if head in CORE:
        return "core"
    if head in TOOLS:
        return "tools"
    return head


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("clinik_local", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that runs (skipping ``if TYPE_CHECKING:`` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str) -> list[tuple[str, str]]:
    """(imported clinik_local module, imported name or "") for each runtime import."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str]] = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("clinik_local")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("clinik_local"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "") if sub in MODULES else (target, alias.name))
    return found


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in imports_of(module):
            assert target in MODULES, f"{module} imports unknown {target}"
            if target != module:
                graph[module].add(target)
    return graph


def test_the_import_graph_of_clinik_local_has_no_cycle() -> None:
    graph = edges()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_imports_another_modules_private_name() -> None:
    private = [
        f"{module} imports {name} from {target}"
        for module in MODULES
        for target, name in imports_of(module)
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert private == []


def test_imports_point_down_the_layers() -> None:
    upward = []
    for module, targets in edges().items():
        mine = group_of(module)
        for target in targets:
            theirs = group_of(target)
            if theirs == mine:
                continue
            if RANKS[theirs] >= RANKS[mine]:
                upward.append(f"{module} ({mine}) -> {target} ({theirs})")
    assert upward == []


def test_every_module_has_a_layer_and_the_layers_are_the_documented_ones() -> None:
    assert {group_of(m) for m in MODULES} == set(RANKS)
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for group in RANKS:
        assert f"`{group}" in text, group


def test_the_reference_server_shares_no_code_with_local_storage() -> None:
    server = {target for target, _ in imports_of("clinik_local.testing.server")}
    assert {t for t in server if group_of(t) not in ("core",)} == set()


def test_only_the_connection_pipeline_makes_sqlite_connections() -> None:
    makers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Connection"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "apsw"
            ):
                makers.append(module)
    # The reference server stands in for the remote: its database is not the store's.
    assert sorted(set(makers)) == ["clinik_local.storage.connection", "clinik_local.testing.server"]


SQL_WORDS = ("SELECT ", "INSERT INTO", "DELETE FROM", "UPDATE outbox", "UPDATE tasks")


@pytest.mark.parametrize(
    "module",
    [
        m
        for m in MODULES
        if group_of(m) in ("tasks", "sync", "remotes", "store")
        or m in ("clinik_local.cli", "clinik_local.aio")
    ],
)
def test_sql_lives_only_in_storage(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    sql = [
        n.value[:60]
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and id(n) not in docstrings
        and any(word in n.value for word in SQL_WORDS)
    ]
    assert sql == []


def test_every_tasks_method_has_an_async_twin_with_the_same_signature() -> None:
    public = [n for n, f in inspect.getmembers(TasksResource, inspect.isfunction) if n[0] != "_"]
    assert public  # the resource has methods to mirror
    for name in public:
        twin = getattr(AsyncTasksResource, name, None)
        assert twin is not None, f"AsyncTasksResource lacks {name}"
        if name == "watch":
            # watch(callback) -> unsubscribe has an async-iterator twin: watch() yields
            # the same ChangeEvents (tests/test_watch.py); leaving the loop unsubscribes.
            assert inspect.isasyncgenfunction(twin), name
            assert list(inspect.signature(twin).parameters) == ["self"], name
            assert list(inspect.signature(TasksResource.watch).parameters) == [
                "self",
                "callback",
            ]
            continue
        assert inspect.iscoroutinefunction(twin), name
        assert inspect.signature(twin) == inspect.signature(getattr(TasksResource, name)), name


def test_old_import_paths_still_work() -> None:
    from clinik_local.pytest_plugin import TaskFactory
    from clinik_local.server import Faults, ReferenceServer
    from clinik_local.testing import pytest_plugin, server

    assert ReferenceServer is server.ReferenceServer
    assert Faults is server.Faults
    assert TaskFactory is pytest_plugin.TaskFactory


# --- the connection pipeline -----------------------------------------------------------------


@pytest.fixture
def recorded_roles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A first step added to SETUP, as an encryption key step would be: it sees every role."""
    roles: list[str] = []

    def record(conn: apsw.Connection, opening: connection.Opening) -> None:
        roles.append(opening.role)

    monkeypatch.setattr(connection, "SETUP", (connection.Step(record), *connection.SETUP))
    return roles


def _wake_checkpointer(store: TaskStore) -> None:
    checkpointer = store._db._checkpointer
    assert checkpointer is not None
    checkpointer._ensure_thread()
    checkpointer._wake.set()


def _until(predicate: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_step_added_to_setup_reaches_every_connection_role(
    tmp_path: Path, recorded_roles: list[str]
) -> None:
    with TaskStore.open(tmp_path / "s.db") as store:
        store.tasks.create({"status": "draft", "intent": "order"})
        thread = threading.Thread(target=lambda: store.tasks.count())
        thread.start()
        thread.join()
        _wake_checkpointer(store)
        _until(lambda: "checkpointer" in recorded_roles)
    assert {"writer", "reader", "checkpointer"} <= set(recorded_roles)
    assert recorded_roles[0] == "writer"


def test_a_checkpointer_that_cannot_open_is_logged_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(conn: apsw.Connection, opening: connection.Opening) -> None:
        raise StorageError("no key for the checkpointer")

    step = connection.Step(refuse, frozenset({"checkpointer"}))
    monkeypatch.setattr(connection, "SETUP", (step, *connection.SETUP))
    with (
        caplog.at_level(logging.WARNING, "clinik_local.storage"),
        TaskStore.open(tmp_path / "c.db") as store,
    ):
        store.tasks.create({"status": "draft", "intent": "order"})
        _wake_checkpointer(store)
        _until(lambda: "checkpoint connection" in caplog.text)
        assert store.tasks.count().data == 1  # the store goes on working
    assert "no key for the checkpointer" in caplog.text


def test_readers_are_query_only_and_a_write_through_one_changes_nothing(
    tmp_path: Path,
) -> None:
    with TaskStore.open(tmp_path / "r.db") as store:
        store.tasks.create({"status": "draft", "intent": "order"})
        with pytest.raises(StorageError), store.read() as conn:
            conn.execute("DELETE FROM tasks")
        with store.read() as conn:
            assert conn.pragma("query_only") == 1
        assert store.tasks.count().data == 1


# --- local edits vs server copies, and the remote seam --------------------------------------


def test_create_many_with_the_id_of_a_deleted_task_is_task_exists_and_writes_nothing(
    tmp_path: Path,
) -> None:
    with TaskStore.open(tmp_path / "d.db") as store:
        store.tasks.create({"id": "task_gone", "status": "draft", "intent": "order"})
        store.tasks.delete("task_gone")
        counts = store.table_counts()
        with pytest.raises(TaskExistsError) as caught:
            store.tasks.create_many(
                [
                    {"id": "task_new", "status": "draft", "intent": "order"},
                    {"id": "task_gone", "status": "draft", "intent": "order"},
                ]
            )
        assert "task_gone" in str(caught.value)
        assert store.table_counts() == counts


class FakeRemote:
    """A Remote that answers from a script (default: delivered at version n)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.script: list[PushOutcome] = []
        self.closed = 0

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        self.changes.append(change)
        if self.script:
            return self.script.pop(0)
        return Delivered(version=str(len(self.changes)), modified="2024-01-01T00:00:00.000Z")

    def close(self) -> None:
        self.closed += 1


def test_an_injected_remote_gets_each_change_with_the_servers_last_version() -> None:
    remote = FakeRemote()
    with TaskStore.open(":memory:", sync=SyncConfig(remote=remote, lanes=1)) as store:
        task = store.tasks.create({"status": "draft", "intent": "order"}).data
        assert task.id is not None
        assert store.sync.flush(timeout=5)
        store.tasks.update(task.id, {"status": "requested"})
        assert store.sync.flush(timeout=5)
        assert store.tasks.get(task.id).meta["syncState"] == "synced"
    first, second = remote.changes
    assert (first.op, first.server_version) == ("create", None)
    assert first.body is not None
    assert "versionId" not in first.body
    assert (second.op, second.server_version) == ("update", "1")
    assert remote.closed >= 1


def test_keep_remote_stores_a_server_copy_and_queues_nothing() -> None:
    remote = FakeRemote()
    with TaskStore.open(":memory:", sync=SyncConfig(remote=remote, lanes=1)) as store:
        task = store.tasks.create({"status": "draft", "intent": "order"}).data
        assert task.id is not None
        assert store.sync.flush(timeout=5)
        server = {
            "id": task.id,
            "status": "cancelled",
            "intent": "order",
            "authoredOn": task.authored_on,
            "versionId": "9",
            "lastModified": "2024-02-02T00:00:00.000Z",
        }
        remote.script = [Conflict(server_task=server, status=412, body=json.dumps(server))]
        store.tasks.update(task.id, {"status": "requested"})
        store.sync.flush(timeout=5)
        assert [c.task_id for c in store.sync.conflicts()] == [task.id]
        store.sync.resolve(task.id, keep="remote")
        got = store.tasks.get(task.id)
        assert got.data.status.value == "cancelled"
        assert got.meta["syncState"] == "synced"
        assert store.sync.status().pending == 0
        last = store.tasks.history(task.id).data[-1]
        assert (last.op, last.override_reason) == ("update", "sync conflict")
    assert len(remote.changes) == 2  # nothing was sent for the resolution


def test_sync_config_refuses_a_remote_that_is_not_one() -> None:
    with pytest.raises(clinik_local.ValidationError, match="remote"):
        SyncConfig(remote=object())  # type: ignore[arg-type]


def _clinik(handler: Any) -> ClinikRemote:
    return ClinikRemote(
        "http://127.0.0.1:9/api",
        lambda: "token",
        http_transport=httpx.MockTransport(handler),
    )


CHANGE = Change(
    change_id="chg_1",
    task_id="task_1",
    op="update",
    body={"id": "task_1", "status": "draft", "versionId": "3"},
    server_version="3",
)


def test_clinik_remote_speaks_the_contract_over_an_injected_transport() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        task = {"id": "task_1", "versionId": "4", "lastModified": "2024-01-01T00:00:00.000Z"}
        return httpx.Response(200, json={"data": task}, headers={"ETag": '"4"'})

    outcome = _clinik(handler).push(CHANGE, lane=0)
    assert isinstance(outcome, Delivered)
    assert (outcome.version, outcome.gone) == ("4", False)
    (request,) = seen
    assert (request.method, request.url.path) == ("PUT", "/api/tasks/task_1")
    assert request.headers["Idempotency-Key"] == "chg_1"
    assert request.headers["If-Match"] == '"3"'
    assert request.headers["Authorization"] == "Bearer token"
    assert "versionId" not in json.loads(request.content)


@pytest.mark.parametrize(
    ("status", "headers", "kind"),
    [
        (412, {}, Conflict),
        (503, {"Retry-After": "7"}, Transient),
        (422, {}, Refused),
        (401, {}, AuthFailed),
    ],
)
def test_clinik_remote_classifies_each_answer(
    status: int, headers: dict[str, str], kind: type
) -> None:
    outcome = _clinik(lambda r: httpx.Response(status, json={"data": None}, headers=headers)).push(
        CHANGE, lane=0
    )
    assert isinstance(outcome, kind)
    if isinstance(outcome, Transient):
        assert outcome.retry_after == 7.0


def test_clinik_remote_maps_network_failures_to_outcomes_not_exceptions() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("reset", request=request)

    assert isinstance(_clinik(refuse).push(CHANGE, lane=0), Unreachable)
    assert isinstance(_clinik(reset).push(CHANGE, lane=0), Transient)
