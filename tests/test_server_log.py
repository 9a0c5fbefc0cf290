"""The reference server's change log and bootstrap keep sync-protocol.md exactly.

"Pull: the change log" and "Bootstrap": one item per accepted write in commit order,
``versionId``/``changeId`` per item, filters matched before or after a write, paging
that never skips, ``410 cursor_expired`` past retention, and ``changesCursor`` plus the
log giving exactly the server's tasks. Everything goes over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local.errors import NotFoundError, ValidationError
from clinik_local.server import Faults, ReferenceServer

TOKEN = "log-token"
BASE: dict[str, Any] = {"status": "requested", "intent": "order", "code": "lab-order"}


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token=TOKEN) as srv:
        yield srv


@pytest.fixture
def client(server: ReferenceServer) -> Iterator[httpx.Client]:
    with _client(server) as c:
        yield c


def _client(server: ReferenceServer) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )


def task(task_id: str, **fields: Any) -> dict[str, Any]:
    return {**BASE, "id": task_id, **fields}


def create(client: httpx.Client, body: Mapping[str, Any], key: str) -> dict[str, Any]:
    answer = client.post("/tasks", content=json.dumps(body), headers={"Idempotency-Key": key})
    assert answer.status_code == 201, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


def replace(client: httpx.Client, body: Mapping[str, Any], key: str) -> dict[str, Any]:
    answer = client.put(
        f"/tasks/{body['id']}", content=json.dumps(body), headers={"Idempotency-Key": key}
    )
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


def delete(client: httpx.Client, task_id: str, key: str) -> None:
    answer = client.delete(f"/tasks/{task_id}", headers={"Idempotency-Key": key})
    assert answer.status_code == 200, answer.text


def log_page(client: httpx.Client, **params: Any) -> dict[str, Any]:
    answer = client.get("/tasks/changes", params=params)
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    return page


def pull_all(client: httpx.Client, since: str | None = None, **params: Any) -> list[dict[str, Any]]:
    """Page the log with nextCursor until hasMore is false."""
    items: list[dict[str, Any]] = []
    while True:
        query = dict(params) if since is None else {**params, "since": since}
        page = log_page(client, **query)
        items += page["data"]
        since = page["meta"]["nextCursor"]
        if not page["meta"]["hasMore"]:
            return items


def test_one_item_per_write_with_its_version_and_change_id(
    client: httpx.Client, server: ReferenceServer
) -> None:
    created = create(client, task("task_a"), "chg_1")
    replaced = replace(client, {**created, "note": "v2"}, "chg_2")
    delete(client, "task_a", "chg_3")
    direct = server.put_task(task("task_b"))
    updated = server.update_task("task_b", {"ownerId": "prac_x"})
    server.delete_task("task_b")
    items = pull_all(client)
    assert [(i["id"], i["deleted"], i["changeId"]) for i in items] == [
        ("task_a", False, "chg_1"),
        ("task_a", False, "chg_2"),
        ("task_a", True, "chg_3"),
        ("task_b", False, None),
        ("task_b", False, None),
        ("task_b", True, None),
    ]
    versions = [i["versionId"] for i in items]
    assert versions[0] == created["versionId"]
    assert versions[1] == replaced["versionId"]
    assert versions[3] == direct["versionId"]
    assert versions[4] == updated["versionId"]
    assert [int(v) for v in versions] == sorted({int(v) for v in versions})  # unique, rising
    assert items[1]["task"] == replaced
    assert items[4]["task"]["ownerId"] == "prac_x"
    assert "task" not in items[2]
    assert "task" not in items[5]


def test_refused_and_replayed_writes_add_nothing_to_the_log(
    client: httpx.Client, server: ReferenceServer
) -> None:
    create(client, task("task_a"), "chg_1")
    create(client, task("task_a"), "chg_1")  # a replay: the first answer, applied once
    conflict = client.post(
        "/tasks", content=json.dumps(task("task_a")), headers={"Idempotency-Key": "chg_2"}
    )
    assert conflict.status_code == 409
    stale = client.put(
        "/tasks/task_a",
        content=json.dumps(task("task_a", note="x")),
        headers={"Idempotency-Key": "chg_3", "If-Match": '"999"'},
    )
    assert stale.status_code == 412
    assert [i["changeId"] for i in pull_all(client)] == ["chg_1"]


def test_a_task_handed_to_another_owner_shows_in_my_filtered_log(
    client: httpx.Client, server: ReferenceServer
) -> None:
    server.put_task(task("task_mine", ownerId="prac_me"))
    server.put_task(task("task_theirs", ownerId="prac_them"))
    cursor = server.changes_cursor()
    server.update_task("task_mine", {"ownerId": "prac_them"})  # handed away: before matched
    server.update_task("task_theirs", {"ownerId": "prac_me"})  # handed to me: after matches
    server.update_task("task_theirs", {"note": "still mine"})
    server.put_task(task("task_other", ownerId="prac_them"))  # never mine: not shown
    server.update_task("task_mine", {"note": "not mine any more"})  # neither side: not shown
    items = pull_all(client, since=cursor, ownerId="prac_me")
    assert [(i["id"], i["task"]["ownerId"]) for i in items] == [
        ("task_mine", "prac_them"),
        ("task_theirs", "prac_me"),
        ("task_theirs", "prac_me"),
    ]


def test_filters_and_across_names_a_comma_is_or_and_deletes_match_the_task_before(
    client: httpx.Client, server: ReferenceServer
) -> None:
    server.put_task(task("t1", ownerId="a", status="requested"))
    server.put_task(task("t2", ownerId="b", status="accepted"))
    server.put_task(task("t3", ownerId="a", status="completed"))
    server.put_task(task("t4", ownerId="c", status="requested"))
    server.delete_task("t2")
    server.delete_task("t4")
    items = pull_all(client, ownerId="a,b", status="requested,accepted")
    assert [(i["id"], i["deleted"]) for i in items] == [
        ("t1", False),
        ("t2", False),
        ("t2", True),
    ]
    assert [i["id"] for i in pull_all(client, code="lab-order", priority="stat")] == []


def test_next_cursor_is_since_when_nothing_is_new_and_omitting_since_starts_at_the_oldest(
    client: httpx.Client, server: ReferenceServer
) -> None:
    empty = log_page(client)
    assert empty == {
        "data": [],
        "meta": {"nextCursor": empty["meta"]["nextCursor"], "hasMore": False},
    }
    assert isinstance(empty["meta"]["nextCursor"], str)
    for n in range(5):
        server.put_task(task(f"t{n}"))
    first = log_page(client, limit=2)
    assert [i["id"] for i in first["data"]] == ["t0", "t1"]
    assert first["meta"]["hasMore"]
    since_empty = log_page(client, since=empty["meta"]["nextCursor"])
    assert [i["id"] for i in since_empty["data"]] == [f"t{n}" for n in range(5)]
    end = since_empty["meta"]["nextCursor"]
    assert log_page(client, since=end) == {
        "data": [],
        "meta": {"nextCursor": end, "hasMore": False},
    }
    assert end == server.changes_cursor()


def test_limit_defaults_to_100_and_is_1_to_1000(
    client: httpx.Client, server: ReferenceServer
) -> None:
    for n in range(101):
        server.put_task(task(f"t{n:03d}"))
    page = log_page(client)
    assert len(page["data"]) == 100
    assert page["meta"]["hasMore"] is True
    assert len(log_page(client, limit=1000)["data"]) == 101
    for bad in ("0", "1001", "-1", "ten"):
        answer = client.get("/tasks/changes", params={"limit": bad})
        assert answer.status_code == 400
        assert answer.json()["error"]["field"] == "limit"


def test_paging_until_has_more_is_false_sees_every_write_while_writes_interleave(
    server: ReferenceServer,
) -> None:
    written: list[str] = []
    stop = threading.Event()

    def writer(prefix: str) -> None:
        with _client(server) as c:
            n = 0
            while not stop.is_set() and n < 150:
                created = create(c, task(f"{prefix}{n}"), f"{prefix}k{n}")
                written.append(created["versionId"])
                if n % 3 == 0:
                    delete(c, f"{prefix}{n}", f"{prefix}d{n}")
                n += 1

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    seen: list[dict[str, Any]] = []
    with _client(server) as reader:
        since: str | None = None
        deadline = time.monotonic() + 30
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            page = log_page(reader, limit=7, **({} if since is None else {"since": since}))
            seen += page["data"]
            since = page["meta"]["nextCursor"]
        stop.set()
        for t in threads:
            t.join()
        seen += pull_all(reader, since=since, limit=7)
    positions = [int(i["versionId"]) for i in seen]
    assert positions == list(range(1, len(positions) + 1))  # in order, none skipped, no repeat
    assert set(written) <= {i["versionId"] for i in seen}
    with _client(server) as again:
        assert len(seen) == len(pull_all(again, limit=1000))


def test_a_since_older_than_the_kept_log_is_410_cursor_expired(
    client: httpx.Client, server: ReferenceServer
) -> None:
    start = server.changes_cursor()
    for n in range(4):
        server.put_task(task(f"t{n}"))
    middle = log_page(client, limit=2)["meta"]["nextCursor"]
    oldest = server.compact_log(keep_last=1)
    for since in (start, middle):
        answer = client.get("/tasks/changes", params={"since": since})
        assert answer.status_code == 410
        assert answer.json()["error"]["code"] == "cursor_expired"
    kept = log_page(client, since=oldest)
    assert [i["id"] for i in kept["data"]] == ["t3"]
    assert [i["id"] for i in log_page(client)["data"]] == ["t3"]  # no since: oldest kept
    assert server.tasks().keys() == {"t0", "t1", "t2", "t3"}  # compaction drops log only


def test_entries_older_than_log_retention_expire(tmp_path: Path) -> None:
    with ReferenceServer(token=TOKEN, log_retention=0.2) as server, _client(server) as client:
        start = server.changes_cursor()
        server.put_task(task("t_old"))
        assert [i["id"] for i in log_page(client, since=start)["data"]] == ["t_old"]
        time.sleep(0.3)
        server.put_task(task("t_new"))
        assert client.get("/tasks/changes", params={"since": start}).status_code == 410
        assert [i["id"] for i in log_page(client)["data"]] == ["t_new"]


def test_a_cursor_from_another_server_database_is_410_and_a_forged_one_400(
    client: httpx.Client, server: ReferenceServer
) -> None:
    with ReferenceServer(token=TOKEN) as other:
        foreign = other.changes_cursor()
    answer = client.get("/tasks/changes", params={"since": foreign})
    assert answer.status_code == 410
    assert answer.json()["error"]["code"] == "cursor_expired"
    epoch = server.changes_cursor().split("-")[0]
    for forged in ("7", "abc", f"{epoch}-99", f"{epoch}-{10**20}"):
        answer = client.get("/tasks/changes", params={"since": forged})
        assert answer.status_code == 400, forged
        assert answer.json()["error"] == {
            "code": "bad_request",
            "message": answer.json()["error"]["message"],
            "field": "since",
        }


def test_the_first_listing_page_carries_changes_cursor_and_later_pages_do_not(
    client: httpx.Client, server: ReferenceServer
) -> None:
    for n in range(3):
        server.put_task(task(f"t{n}"))
    first = client.get("/tasks", params={"limit": 2}).json()
    assert first["meta"]["changesCursor"] == server.changes_cursor()
    rest = client.get("/tasks", params={"limit": 2, "cursor": first["meta"]["nextCursor"]}).json()
    assert "changesCursor" not in rest["meta"]
    assert log_page(client, since=first["meta"]["changesCursor"])["data"] == []


def test_unknown_or_repeated_query_parameters_are_400_naming_them(client: httpx.Client) -> None:
    for path, query in (
        ("/tasks/changes", "owner=x"),
        ("/tasks/changes", "ownerId=a&ownerId=b"),
        ("/tasks/changes", "ownerId="),
        ("/tasks", "cursor=x&since=y"),
    ):
        answer = client.get(f"{path}?{query}")
        assert answer.status_code == 400, query
        assert answer.json()["error"]["code"] == "bad_request"
        assert answer.json()["error"]["field"] in {"owner", "ownerId", "since"}


def test_the_test_api_refuses_bad_tasks_with_the_library_errors(server: ReferenceServer) -> None:
    with pytest.raises(ValidationError) as refused:
        server.put_task(task("t1", status="bogus"))
    assert refused.value.paths == ("status",)
    with pytest.raises(NotFoundError):
        server.update_task("missing", {"note": "x"})
    with pytest.raises(NotFoundError):
        server.delete_task("missing")
    assert server.put_task({"id": "t_raw", "futureField": 1}, validate=False)["futureField"] == 1
    with _client(server) as client:
        assert pull_all(client)[-1]["task"]["futureField"] == 1


def test_a_database_from_before_the_log_is_migrated_with_the_task_states(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = apsw.Connection(str(db))
    conn.execute(
        "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL,"
        " deleted INTEGER NOT NULL, body TEXT)"
    )
    conn.execute(
        "INSERT INTO changes VALUES (1, 't1', 0, ?), (2, 't1', 0, ?), (3, 't1', 1, NULL)",
        (json.dumps(task("t1", ownerId="a")), json.dumps(task("t1", ownerId="b"))),
    )
    conn.close()
    with ReferenceServer(token=TOKEN, db=str(db)) as server, _client(server) as client:
        items = pull_all(client, ownerId="a")
        assert [(i["id"], i["deleted"], i["versionId"]) for i in items] == [
            ("t1", False, "1"),
            ("t1", False, "2"),
        ]
        assert server.put_task(task("t2"))["versionId"] == "4"


# --- bootstrap: changesCursor + the log = exactly the server's tasks ---------------------

SCOPES: list[dict[str, str]] = [
    {},
    {"ownerId": "a"},
    {"ownerId": "a,b", "status": "requested"},
    {"patientId": "p1"},
]
OWNERS = st.sampled_from(["a", "b", "c"])
WRITE = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 9), OWNERS, st.sampled_from(["p1", "p2"])),
    st.tuples(st.just("owner"), st.integers(0, 9), OWNERS),
    st.tuples(st.just("status"), st.integers(0, 9), st.sampled_from(["requested", "accepted"])),
    st.tuples(st.just("patient"), st.integers(0, 9), st.sampled_from(["p1", "p2"])),
    st.tuples(st.just("delete"), st.integers(0, 9)),
)
STEP = st.one_of(st.tuples(st.just("page")), WRITE)


def _matches(t: Mapping[str, Any], scope: Mapping[str, str]) -> bool:
    return all(t.get(name) in value.split(",") for name, value in scope.items())


def _write(server: ReferenceServer, client: httpx.Client, step: tuple[Any, ...], n: int) -> None:
    kind, index = step[0], f"t{step[1]}"
    exists = index in server.tasks()
    if kind == "create":
        if not exists:
            body = task(index, ownerId=step[2], patientId=step[3])
            if n % 2:  # some writes over HTTP (with a changeId), some through the test API
                create(client, body, f"chg_{n}")
            else:
                server.put_task(body)
    elif not exists:
        return
    elif kind == "delete":
        if n % 2:
            delete(client, index, f"chg_{n}")
        else:
            server.delete_task(index)
    else:
        field = {"owner": "ownerId", "status": "status", "patient": "patientId"}[kind]
        server.update_task(index, {field: step[2]})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scope=st.sampled_from(SCOPES),
    before=st.lists(WRITE, max_size=8),
    during=st.lists(STEP, max_size=20),
    after=st.lists(WRITE, max_size=6),
    page_size=st.integers(1, 3),
)
def test_bootstrap_then_the_log_holds_exactly_the_servers_tasks_for_the_scope(
    scope: dict[str, str],
    before: list[tuple[Any, ...]],
    during: list[tuple[Any, ...]],
    after: list[tuple[Any, ...]],
    page_size: int,
) -> None:
    with ReferenceServer(token=TOKEN) as server, _client(server) as client:
        n = 0
        for step in before:
            _write(server, client, step, n := n + 1)
        replica: dict[str, dict[str, Any]] = {}
        first = client.get("/tasks", params={**scope, "limit": page_size}).json()
        cursor = first["meta"]["changesCursor"]
        page = first
        steps = iter(during)
        while True:  # listing pages, with writes interleaved between them
            replica.update({t["id"]: t for t in page["data"]})
            if not page["meta"]["hasMore"]:
                break
            for step in steps:
                if step[0] == "page":
                    break
                _write(server, client, step, n := n + 1)
            params = {**scope, "limit": page_size, "cursor": page["meta"]["nextCursor"]}
            page = client.get("/tasks", params=params).json()
            assert "changesCursor" not in page["meta"]
        for step in [*steps, *after]:
            if step[0] != "page":
                _write(server, client, step, n := n + 1)
        for item in pull_all(client, since=cursor, limit=page_size, **scope):
            if item["deleted"] or not _matches(item["task"], scope):
                replica.pop(item["id"], None)
            else:
                replica[item["id"]] = item["task"]
        expected = {k: v for k, v in server.tasks().items() if _matches(v, scope)}
        assert replica == expected


# --- faults on reads ----------------------------------------------------------------------


def test_read_faults_are_off_by_default_even_when_every_write_faults(
    client: httpx.Client, server: ReferenceServer
) -> None:
    server.faults.rate = 1.0
    server.faults.kinds = ("error_5xx",)
    assert client.get("/tasks").status_code == 200
    assert client.get("/tasks/changes").status_code == 200
    assert server.faults.injected == {}
    assert server.faults.injected_reads == {}


def test_scripted_read_faults_drop_error_limit_and_lose_a_log_page(
    client: httpx.Client, server: ReferenceServer
) -> None:
    for n in range(3):
        server.put_task(task(f"t{n}"))
    server.faults.retry_after = "3"
    server.faults.read_script = ["drop_before", "error_5xx", "rate_limit", "drop_after"]
    with pytest.raises(httpx.TransportError):
        client.get("/tasks/changes")
    unavailable = client.get("/tasks/changes")
    assert unavailable.status_code == 503
    assert unavailable.json()["error"]["code"] == "unavailable"
    limited = client.get("/tasks")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "3"
    with pytest.raises(httpx.TransportError):  # the page was read, then lost on the way
        client.get("/tasks/changes")
    assert [i["id"] for i in log_page(client)["data"]] == ["t0", "t1", "t2"]  # asked again
    assert server.faults.injected_reads == {
        "drop_before": 1,
        "error_5xx": 1,
        "rate_limit": 1,
        "drop_after": 1,
    }
    assert server.faults.injected == {}


def test_short_pages_say_has_more_and_paging_still_sees_every_write(
    client: httpx.Client, server: ReferenceServer
) -> None:
    for n in range(12):
        server.put_task(task(f"t{n:02d}"))
    server.faults.read_rate = 1.0
    server.faults.read_kinds = ("short_page",)
    first = log_page(client, limit=10)
    assert 1 <= len(first["data"]) < 10
    assert first["meta"]["hasMore"] is True
    items = pull_all(client, limit=10)
    assert [i["id"] for i in items] == [f"t{n:02d}" for n in range(12)]
    listed: list[str] = []
    params: dict[str, Any] = {"limit": 5}
    while True:
        page = client.get("/tasks", params=params).json()
        listed += [t["id"] for t in page["data"]]
        if not page["meta"]["hasMore"]:
            break
        params["cursor"] = page["meta"]["nextCursor"]
    assert listed == [f"t{n:02d}" for n in range(12)]


def test_a_client_retrying_through_random_read_faults_sees_every_write_once() -> None:
    faults = Faults(read_rate=0.4, seed=7, slow_seconds=0.001)
    with ReferenceServer(token=TOKEN, faults=faults) as server, _client(server) as client:
        for n in range(30):
            server.put_task(task(f"t{n:02d}"))
            if n % 4 == 0:
                server.delete_task(f"t{n:02d}")
        seen: list[str] = []
        since: str | None = None
        for _ in range(500):
            try:
                answer = client.get(
                    "/tasks/changes", params={"limit": 4, **({"since": since} if since else {})}
                )
            except httpx.TransportError:
                continue
            if answer.status_code != 200:
                assert answer.status_code in {429, 503}
                continue
            page = answer.json()
            seen += [i["versionId"] for i in page["data"]]
            since = page["meta"]["nextCursor"]
            if not page["meta"]["hasMore"]:
                break
        assert seen == [str(n) for n in range(1, 39)]
        assert sum(faults.injected_reads.values()) >= 5
