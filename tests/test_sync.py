"""The sync engine against the reference server on 127.0.0.1: every rule of sync-protocol.md."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clinik_local import SyncError, TaskStore, ValidationError
from clinik_local.codec import encode_task
from clinik_local.server import Faults, ReferenceServer
from clinik_local.sync import SyncConfig, SyncStatus

REQUEST: dict[str, Any] = {"status": "requested", "intent": "order", "code": "lab-order"}
BOOKKEEPING = ("versionId", "lastModified")


def _strip(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if k not in BOOKKEEPING}


def local_tasks(store: TaskStore) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        page = (
            store.tasks.search(limit=1000, cursor=cursor)
            if cursor
            else store.tasks.search(limit=1000)
        )
        for task in page.data:
            out[str(task.id)] = _strip(encode_task(task))
        cursor = page.meta["nextCursor"]
        if not cursor:
            return out


def server_tasks(server: ReferenceServer) -> dict[str, dict[str, Any]]:
    return {k: _strip(v) for k, v in server.tasks().items()}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token="tok-1") as srv:
        yield srv


class Provider:
    """A token provider that reads the server's current token and counts calls."""

    def __init__(self, server: ReferenceServer) -> None:
        self.server = server
        self.calls = 0
        self.fixed: str | None = None

    def __call__(self) -> str:
        self.calls += 1
        return self.fixed if self.fixed is not None else self.server.token


def make_config(server: ReferenceServer, provider: Callable[[], str], **kw: Any) -> SyncConfig:
    settings: dict[str, Any] = {
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        "timeout": 2.0,
        "jitter_seed": 1,
    }
    settings.update(kw)
    return SyncConfig(base_url=server.url, token_provider=provider, **settings)


@pytest.fixture
def provider(server: ReferenceServer) -> Provider:
    return Provider(server)


@pytest.fixture
def store(tmp_path: Path, server: ReferenceServer, provider: Provider) -> Iterator[TaskStore]:
    with TaskStore.open(tmp_path / "s.db", sync=make_config(server, provider)) as st:
        yield st


# --- configuration ---------------------------------------------------------------------------


# (Plain http refused for a remote host unless asked, allowed to loopback:
# tests/test_security.py.)


def test_config_rejects_a_token_provider_that_is_not_callable() -> None:
    with pytest.raises(ValidationError) as info:
        SyncConfig(base_url="https://h/api", token_provider="secret")  # type: ignore[arg-type]
    assert info.value.paths == ("token_provider",)
    assert "secret" not in str(info.value)


def test_config_does_not_show_the_token_provider_in_its_repr() -> None:
    config = SyncConfig(base_url="https://h/api", token_provider=lambda: "tok-secret")
    assert "token_provider" not in repr(config)


def test_store_without_sync_says_so_when_sync_is_used() -> None:
    with TaskStore.open(":memory:") as st, pytest.raises(SyncError):
        st.sync.status()


# --- delivery ------------------------------------------------------------------------------


def test_flush_delivers_creates_updates_and_deletes_and_marks_tasks_synced(
    store: TaskStore, server: ReferenceServer
) -> None:
    a = store.tasks.create(REQUEST).data
    b = store.tasks.create({**REQUEST, "note": "second"}).data
    store.tasks.update(str(a.id), {"status": "accepted", "ownerId": "prac_1"})
    store.tasks.delete(str(b.id))
    assert store.tasks.get(str(a.id)).meta["syncState"] == "pending"
    assert store.sync.flush(timeout=10)
    assert server_tasks(server) == local_tasks(store)
    assert store.tasks.get(str(a.id)).meta["syncState"] == "synced"
    assert set(server.applied_counts().values()) == {1}
    assert len(server.applied_counts()) == 4
    status = store.sync.status()
    assert (status.state, status.pending, status.dead) == ("idle", 0, 0)
    assert status.last_success_at is not None


def test_update_carries_if_match_of_the_servers_version(
    store: TaskStore, server: ReferenceServer
) -> None:
    task = store.tasks.create(REQUEST).data
    assert store.sync.flush(timeout=10)
    # Another client moves the server's task on: our next update must be refused (412).
    server.put_task({**server.tasks()[str(task.id)], "note": "theirs"})
    store.tasks.update(str(task.id), {"note": "ours"})
    assert store.sync.flush(timeout=10)  # parked changes do not count
    assert [c.task_id for c in store.sync.conflicts()] == [task.id]
    assert server.tasks()[str(task.id)]["note"] == "theirs"


def test_changes_of_one_task_are_applied_in_the_order_they_were_made(
    tmp_path: Path, server: ReferenceServer, provider: Provider
) -> None:
    # Push only: a pulling store may rebase (squash) changes whose answers were lost
    # onto the server's copy (tests/test_sync_rebase.py); here every change goes alone.
    store = TaskStore.open(tmp_path / "push.db", sync=make_config(server, provider, pull=False))
    ids = [str(store.tasks.create({**REQUEST, "note": f"n{i}"}).data.id) for i in range(20)]
    for round_ in range(3):
        for task_id in ids:
            store.tasks.update(task_id, {"note": f"{task_id}-{round_}"})
    server.faults.rate = 0.3
    server.faults.kinds = ("drop_before", "drop_after", "error_5xx", "rate_limit")
    assert store.sync.flush(timeout=20)
    per_task: dict[str, list[str]] = {}
    for key, task_id, _method in server.applied_log():
        per_task.setdefault(task_id, []).append(key)
    assert all(keys == sorted(keys) and len(keys) == 4 for keys in per_task.values())
    assert server_tasks(server) == local_tasks(store)
    store.close()


def test_rejected_task_is_a_dead_letter_while_a_thousand_others_go_through(
    store: TaskStore, server: ReferenceServer
) -> None:
    bad = store.tasks.create({**REQUEST, "id": "task_refused"}).data
    store.tasks.create_many([{**REQUEST, "note": f"n{i}"} for i in range(1000)])
    store.tasks.update(str(bad.id), {"note": "still refused"})  # held behind the dead letter
    server.faults.reject_ids = {"task_refused"}
    assert store.sync.flush(timeout=30)
    assert len(server.tasks()) == 1000
    assert "task_refused" not in server.tasks()
    letters = store.sync.dead_letters()
    assert [(d.task_id, d.status, d.op) for d in letters] == [("task_refused", 422, "create")]
    assert "rejected" in (letters[0].body or "")
    assert store.tasks.get("task_refused").meta["syncState"] == "rejected"
    status = store.sync.status()
    assert (status.dead, status.pending) == (1, 1)


def test_retry_of_a_dead_letter_sends_it_again_and_discard_drops_it(
    store: TaskStore, server: ReferenceServer
) -> None:
    store.tasks.create({**REQUEST, "id": "task_a"})
    store.tasks.create({**REQUEST, "id": "task_b"})
    server.faults.reject_ids = {"task_a", "task_b"}
    assert store.sync.flush(timeout=10)
    letters = {d.task_id: d.change_id for d in store.sync.dead_letters()}
    server.faults.reject_ids = set()
    store.sync.retry(letters["task_a"])
    store.sync.discard(letters["task_b"])
    assert store.sync.flush(timeout=10)
    assert set(server.tasks()) == {"task_a"}
    assert store.sync.dead_letters() == []
    assert store.tasks.get("task_b").meta["syncState"] == "local-only"


def test_retry_and_discard_of_an_unknown_change_raise_not_found(store: TaskStore) -> None:
    with pytest.raises(LookupError):
        store.sync.retry("chg_nope")
    with pytest.raises(LookupError):
        store.sync.discard("chg_nope")


def test_id_conflict_on_create_is_parked_with_the_servers_body(
    store: TaskStore, server: ReferenceServer
) -> None:
    server.put_task({**REQUEST, "id": "task_taken", "note": "someone else's"})
    store.tasks.create({**REQUEST, "id": "task_taken"})
    assert store.sync.flush(timeout=10)
    [letter] = store.sync.dead_letters()
    assert letter.status == 409
    assert "id_conflict" in (letter.body or "")
    assert server.tasks()["task_taken"]["note"] == "someone else's"


def test_delete_of_a_task_already_gone_on_the_server_counts_as_delivered(
    store: TaskStore, server: ReferenceServer
) -> None:
    task = store.tasks.create(REQUEST).data
    assert store.sync.flush(timeout=10)
    server.faults.script = []
    # The server loses the task behind our back; our delete then gets 404 = delivered.
    with server._state.write() as conn:
        conn.execute("DELETE FROM tasks WHERE id = ?", (str(task.id),))
    store.tasks.delete(str(task.id))
    assert store.sync.flush(timeout=10)
    assert store.sync.dead_letters() == []
    assert store.sync.status().pending == 0


# --- auth ------------------------------------------------------------------------------------


def test_expired_token_is_refreshed_from_the_provider_and_the_change_retried_once(
    store: TaskStore, server: ReferenceServer, provider: Provider
) -> None:
    server.faults.script = ["token_expiry"]
    store.tasks.create(REQUEST)
    assert store.sync.flush(timeout=10)
    assert provider.calls == 2
    assert len(server.tasks()) == 1


def test_token_refused_twice_pauses_with_auth_required_until_notify_online(
    store: TaskStore, server: ReferenceServer, provider: Provider
) -> None:
    provider.fixed = "wrong-token"
    store.tasks.create(REQUEST)
    assert store.sync.flush(timeout=10) is False
    status = store.sync.status()
    assert status.state == "auth_required"
    assert status.pending == 1
    assert provider.calls == 2
    assert "wrong-token" not in repr(status)
    provider.fixed = None
    store.sync.notify_online()
    assert store.sync.flush(timeout=10)
    assert len(server.tasks()) == 1


def test_a_failing_token_provider_pauses_sync_without_leaking_its_message(
    tmp_path: Path, server: ReferenceServer
) -> None:
    def broken() -> str:
        raise RuntimeError("vault password is hunter2")

    with TaskStore.open(tmp_path / "b.db", sync=make_config(server, broken)) as st:
        st.tasks.create(REQUEST)
        assert st.sync.flush(timeout=5) is False
        status = st.sync.status()
    assert status.state == "auth_required"
    assert status.pending == 1
    assert "hunter2" not in str(status.last_error)
    assert server.tasks() == {}


# --- retries ---------------------------------------------------------------------------------


def test_retry_after_in_seconds_is_honoured(store: TaskStore, server: ReferenceServer) -> None:
    server.faults.retry_after = "1"
    server.faults.script = ["rate_limit"]
    store.tasks.create(REQUEST)
    started = time.monotonic()
    assert store.sync.flush(timeout=10)
    assert time.monotonic() - started >= 0.95
    assert len(server.tasks()) == 1


def test_retry_after_as_an_http_date_is_honoured(store: TaskStore, server: ReferenceServer) -> None:
    server.faults.retry_after = email.utils.formatdate(time.time() + 2, usegmt=True)
    server.faults.script = ["rate_limit"]
    store.tasks.create(REQUEST)
    started = time.monotonic()
    first = store.sync.run_once()
    assert first.state == "backoff"
    assert first.next_retry_at is not None
    assert store.sync.flush(timeout=10)
    assert time.monotonic() - started >= 0.9


def test_background_worker_retries_by_itself_without_a_new_local_write(
    store: TaskStore, server: ReferenceServer
) -> None:
    server.faults.script = ["error_5xx", "drop_before", "error_5xx", "drop_after"]
    store.sync.start()
    store.tasks.create(REQUEST)
    assert wait_for(lambda: len(server.tasks()) == 1)
    assert wait_for(lambda: store.sync.status().pending == 0)
    assert set(server.applied_counts().values()) == {1}
    store.sync.stop()
    assert not store.sync.running


def test_a_backing_off_task_does_not_hold_back_other_tasks(
    store: TaskStore, server: ReferenceServer
) -> None:
    server.faults.retry_after = "30"
    server.faults.script = ["rate_limit"]  # whichever change arrives first waits 30 s
    ids = {str(store.tasks.create({**REQUEST, "note": f"n{n}"}).data.id) for n in range(6)}
    status = store.sync.run_once()
    delivered = set(server.tasks())
    assert len(delivered) == 5
    [waiting] = ids - delivered
    assert status.state == "backoff"
    assert status.pending == 1
    assert store.tasks.get(waiting).meta["syncState"] == "pending"


def test_unreachable_service_reports_offline_and_notify_online_retries_at_once(
    tmp_path: Path,
) -> None:
    server = ReferenceServer(token="t")
    port = server.port
    server.stop()  # nothing listens on that port now
    config = SyncConfig(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        token_provider=lambda: "t",
        backoff_base=60,
        backoff_cap=60,
        jitter_seed=3,
    )
    with TaskStore.open(tmp_path / "o.db", sync=config) as st:
        st.tasks.create(REQUEST)
        status = st.sync.run_once()
        assert status.state == "offline"
        assert status.pending == 1
        assert status.last_error is not None
        assert "connect" in status.last_error
        with ReferenceServer(token="t", port=port) as back:
            st.sync.notify_online()
            assert st.sync.flush(timeout=10)
            assert len(back.tasks()) == 1


def test_mixed_faults_on_a_quarter_of_requests_end_with_equal_tasks_each_key_applied_once(
    tmp_path: Path, server: ReferenceServer, provider: Provider
) -> None:
    server.faults = Faults(rate=0.3, seed=11, slow_seconds=0.3, retry_after="0")
    config = make_config(server, provider, timeout=0.2)
    with TaskStore.open(tmp_path / "m.db", sync=config) as st:
        ids = [str(st.tasks.create({**REQUEST, "note": f"n{i}"}).data.id) for i in range(150)]
        changes = 150
        for task_id in ids[:100]:
            st.tasks.update(task_id, {"status": "accepted"})
            changes += 1
        for task_id in ids[100:120]:
            st.tasks.delete(task_id)
            changes += 1
        st.sync.start()
        deadline = time.monotonic() + 40
        while not st.sync.flush(timeout=1):
            assert time.monotonic() < deadline
            if st.sync.status().state == "auth_required":
                st.sync.notify_online()  # the app got a fresh token: carry on
        st.sync.stop()
        assert server_tasks(server) == local_tasks(st)
        counts = server.applied_counts()
        assert set(counts.values()) == {1}
        assert len(counts) == changes
        injected = server.faults.injected
        assert sum(injected.values()) >= 0.2 * changes
        assert {"drop_before", "drop_after", "error_5xx", "rate_limit", "slow"} <= set(injected)


def test_entries_left_in_flight_by_a_crash_are_resent_with_the_same_key(
    tmp_path: Path, server: ReferenceServer, provider: Provider
) -> None:
    path = tmp_path / "c.db"
    # Push only: a pulling store would learn from the server's copy that the change
    # was applied (tests/test_sync_pull.py); here the resend with the same key does.
    config = make_config(server, provider, pull=False)
    with TaskStore.open(path, sync=config) as st:
        st.tasks.create(REQUEST)
        server.faults.script = ["drop_after"]
        st.sync.run_once()  # applied on the server; the answer was lost
        with st._db.write() as conn:  # as a crash between sending and recording leaves it
            conn.execute("UPDATE outbox SET state = 'in_flight'")
    with TaskStore.open(path, sync=config) as st:
        assert st.sync.status().in_flight == 1
        assert st.sync.flush(timeout=10)
        assert st.sync.status().in_flight == 0
    assert list(server.applied_counts().values()) == [1]
    assert server.requests >= 2


# --- conflicts -------------------------------------------------------------------------------


@pytest.fixture
def conflicted(store: TaskStore, server: ReferenceServer) -> str:
    task = store.tasks.create({**REQUEST, "note": "base"}).data
    assert store.sync.flush(timeout=10)
    server.put_task({**server.tasks()[str(task.id)], "note": "theirs", "ownerId": "prac_them"})
    store.tasks.update(str(task.id), {"note": "ours"})
    assert store.sync.flush(timeout=10)
    return str(task.id)


def test_412_records_a_conflict_with_both_versions_and_overwrites_neither(
    store: TaskStore, server: ReferenceServer, conflicted: str
) -> None:
    [conflict] = store.sync.conflicts()
    assert conflict.task_id == conflicted
    assert conflict.local is not None
    assert conflict.local["note"] == "ours"
    assert conflict.server is not None
    assert conflict.server["note"] == "theirs"
    assert store.tasks.get(conflicted).data.note == "ours"
    assert store.tasks.get(conflicted).meta["syncState"] == "conflict"
    assert server.tasks()[conflicted]["note"] == "theirs"
    assert store.sync.status().conflicts == 1


def test_resolve_keep_local_sends_the_local_edits_on_the_servers_version(
    store: TaskStore, server: ReferenceServer, conflicted: str
) -> None:
    store.sync.resolve(conflicted, keep="local")
    assert store.sync.flush(timeout=10)
    assert server.tasks()[conflicted]["note"] == "ours"
    # Only the server changed the owner: keeping the local side does not revert it.
    assert server.tasks()[conflicted]["ownerId"] == "prac_them"
    assert server_tasks(server) == local_tasks(store)
    assert store.sync.conflicts() == []


def test_resolve_keep_remote_takes_the_servers_task_and_sends_nothing(
    store: TaskStore, server: ReferenceServer, conflicted: str
) -> None:
    before = len(server.applied_log())
    store.sync.resolve(conflicted, keep="remote")
    assert store.sync.status().pending == 0
    assert store.tasks.get(conflicted).data.note == "theirs"
    assert store.tasks.get(conflicted).meta["syncState"] == "synced"
    assert store.sync.flush(timeout=10)
    assert len(server.applied_log()) == before
    assert server_tasks(server) == local_tasks(store)
    # The next local change builds on the server's version: no new conflict.
    store.tasks.update(conflicted, {"status": "accepted"})
    assert store.sync.flush(timeout=10)
    assert store.sync.conflicts() == []
    assert server.tasks()[conflicted]["status"] == "accepted"


def test_resolve_with_a_merged_request_writes_it_locally_and_sends_it(
    store: TaskStore, server: ReferenceServer, conflicted: str
) -> None:
    [conflict] = store.sync.conflicts()
    assert conflict.server is not None
    merged = {**conflict.server, "note": "ours and theirs"}
    store.sync.resolve(conflicted, keep=merged)
    assert store.tasks.get(conflicted).data.owner_id == "prac_them"
    assert store.sync.flush(timeout=10)
    assert server.tasks()[conflicted]["note"] == "ours and theirs"
    assert server_tasks(server) == local_tasks(store)


def test_resolve_refuses_a_bad_merged_request_and_changes_nothing(
    store: TaskStore, conflicted: str
) -> None:
    with pytest.raises(ValidationError) as info:
        store.sync.resolve(conflicted, keep={**REQUEST, "status": "bogus"})
    assert "status" in info.value.paths
    assert len(store.sync.conflicts()) == 1
    with pytest.raises(ValidationError):
        store.sync.resolve(conflicted, keep="mine")  # type: ignore[arg-type]


def test_resolve_of_a_task_without_conflict_raises_not_found(store: TaskStore) -> None:
    with pytest.raises(LookupError):
        store.sync.resolve("task_none", keep="local")


# --- status ----------------------------------------------------------------------------------


def test_status_callbacks_see_uploading_then_idle(
    store: TaskStore, server: ReferenceServer
) -> None:
    seen: list[SyncStatus] = []
    unsubscribe = store.sync.on_status_change(seen.append)
    store.tasks.create(REQUEST)
    assert store.sync.flush(timeout=10)
    states = [s.state for s in seen]
    assert "uploading" in states
    assert states[-1] == "idle"
    assert seen[-1].pending == 0
    unsubscribe()
    count = len(seen)
    store.tasks.create(REQUEST)
    assert store.sync.flush(timeout=10)
    assert len(seen) == count


def test_local_writes_never_wait_for_a_slow_server(
    store: TaskStore, server: ReferenceServer
) -> None:
    server.faults = Faults(rate=1.0, kinds=("slow",), slow_seconds=0.5)
    store.tasks.create(REQUEST)
    store.sync.start()
    assert wait_for(lambda: store.sync.status().in_flight == 1)
    started = time.monotonic()
    store.tasks.create(REQUEST)
    assert time.monotonic() - started < 0.25
    store.sync.stop()
