"""The reference server keeps the HTTP contract of sync-protocol.md (a bare httpx client)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from clinik_local.server import ReferenceServer

TOKEN = "server-token"
TASK: dict[str, Any] = {"id": "task_1", "status": "requested", "intent": "order", "code": "lab"}


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token=TOKEN) as srv:
        yield srv


@pytest.fixture
def client(server: ReferenceServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=5) as c:
        yield c


def post(client: httpx.Client, body: object, key: str) -> httpx.Response:
    return client.post("/tasks", content=json.dumps(body), headers={"Idempotency-Key": key})


def test_requests_without_the_bearer_token_get_401_envelope(server: ReferenceServer) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        answer = anonymous.get("/tasks")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthorized"


def test_create_answers_201_with_server_managed_fields(client: httpx.Client) -> None:
    answer = post(client, TASK, "k1")
    assert answer.status_code == 201
    data = answer.json()["data"]
    assert data["id"] == "task_1"
    assert data["versionId"]
    assert len(data["lastModified"]) == 24
    assert data["lastModified"].endswith("Z")


def test_a_replayed_key_returns_the_first_answer_and_is_applied_once(
    client: httpx.Client, server: ReferenceServer
) -> None:
    first = post(client, TASK, "k1")
    again = post(client, TASK, "k1")
    assert again.status_code == 201
    assert again.json() == first.json()
    assert server.applied_counts() == {"k1": 1}


def test_a_key_reused_for_another_request_is_refused(client: httpx.Client) -> None:
    post(client, TASK, "k1")
    answer = client.put(
        "/tasks/task_1", content=json.dumps(TASK), headers={"Idempotency-Key": "k1"}
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "idempotency_key_reused"


def test_writes_without_an_idempotency_key_are_refused(client: httpx.Client) -> None:
    answer = client.post("/tasks", content=json.dumps(TASK))
    assert answer.status_code == 400


def test_create_with_a_taken_id_is_409_id_conflict(client: httpx.Client) -> None:
    post(client, TASK, "k1")
    answer = post(client, {**TASK, "note": "other"}, "k2")
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "id_conflict"


def test_put_with_a_stale_if_match_is_412_with_the_current_task(client: httpx.Client) -> None:
    version = post(client, TASK, "k1").json()["data"]["versionId"]
    ok = client.put(
        "/tasks/task_1",
        content=json.dumps({**TASK, "note": "v2"}),
        headers={"Idempotency-Key": "k2", "If-Match": f'"{version}"'},
    )
    assert ok.status_code == 200
    assert ok.json()["data"]["versionId"] != version
    stale = client.put(
        "/tasks/task_1",
        content=json.dumps({**TASK, "note": "v3"}),
        headers={"Idempotency-Key": "k3", "If-Match": f'"{version}"'},
    )
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "version_conflict"
    assert stale.json()["data"]["note"] == "v2"


def test_put_or_get_of_a_missing_task_is_404_and_delete_too(client: httpx.Client) -> None:
    body = json.dumps({**TASK, "id": "task_x"})
    put = client.put("/tasks/task_x", content=body, headers={"Idempotency-Key": "k"})
    assert put.status_code == 404
    assert client.get("/tasks/task_x").status_code == 404
    gone = client.delete("/tasks/task_x", headers={"Idempotency-Key": "k9"})
    assert gone.status_code == 404


def test_delete_answers_200_and_the_task_is_gone(client: httpx.Client) -> None:
    version = post(client, TASK, "k1").json()["data"]["versionId"]
    answer = client.delete(
        "/tasks/task_1", headers={"Idempotency-Key": "k2", "If-Match": f'"{version}"'}
    )
    assert answer.status_code == 200
    assert answer.json()["data"] == {"id": "task_1", "deleted": True}
    assert client.get("/tasks/task_1").status_code == 404


def test_invalid_tasks_are_422_naming_the_field_and_bad_json_is_400(client: httpx.Client) -> None:
    invalid = post(client, {**TASK, "status": "bogus"}, "k1")
    assert invalid.status_code == 422
    assert invalid.json()["error"]["field"] == "status"
    broken = client.post("/tasks", content=b"{not json", headers={"Idempotency-Key": "k2"})
    assert broken.status_code == 400


def test_a_body_over_the_limit_is_413(client: httpx.Client) -> None:
    answer = post(client, {**TASK, "note": "x" * (1 << 20)}, "k1")
    assert answer.status_code == 413


def test_search_ands_filters_and_a_comma_means_or_with_paging(client: httpx.Client) -> None:
    for n, (status, owner) in enumerate(
        [("requested", "a"), ("accepted", "a"), ("completed", "a"), ("requested", "b")]
    ):
        post(client, {**TASK, "id": f"task_{n}", "status": status, "ownerId": owner}, f"k{n}")
    page = client.get("/tasks", params={"status": "requested,accepted", "ownerId": "a"}).json()
    assert sorted(t["id"] for t in page["data"]) == ["task_0", "task_1"]
    first = client.get("/tasks", params={"limit": 3}).json()
    assert first["meta"]["hasMore"] is True
    rest = client.get("/tasks", params={"limit": 3, "cursor": first["meta"]["nextCursor"]}).json()
    assert len(first["data"]) + len(rest["data"]) == 4
    assert rest["meta"]["hasMore"] is False


def test_changes_feed_lists_writes_oldest_first_from_a_cursor(client: httpx.Client) -> None:
    version = post(client, TASK, "k1").json()["data"]["versionId"]
    client.delete("/tasks/task_1", headers={"Idempotency-Key": "k2", "If-Match": version})
    post(client, {**TASK, "id": "task_2"}, "k3")
    feed = client.get("/tasks/changes", params={"limit": 2}).json()
    assert [(c["id"], c["deleted"]) for c in feed["data"]] == [("task_1", False), ("task_1", True)]
    assert feed["data"][0]["task"]["id"] == "task_1"
    assert feed["meta"]["hasMore"] is True
    more = client.get("/tasks/changes", params={"since": feed["meta"]["nextCursor"]}).json()
    assert [c["id"] for c in more["data"]] == ["task_2"]
    assert more["meta"]["hasMore"] is False


def test_fault_drop_before_applies_nothing_and_drop_after_applies(
    client: httpx.Client, server: ReferenceServer
) -> None:
    server.faults.script = ["drop_before"]
    with pytest.raises(httpx.HTTPError):
        post(client, TASK, "k1")
    assert server.tasks() == {}
    server.faults.script = ["drop_after"]
    with pytest.raises(httpx.HTTPError):
        post(client, TASK, "k1")
    assert set(server.tasks()) == {"task_1"}
    assert post(client, TASK, "k1").status_code == 201  # the retry is a replay
    assert server.applied_counts() == {"k1": 1}


def test_fault_rate_limit_sends_retry_after_and_5xx_applies_nothing(
    client: httpx.Client, server: ReferenceServer
) -> None:
    server.faults.retry_after = "7"
    server.faults.script = ["rate_limit", "error_5xx"]
    limited = post(client, TASK, "k1")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "7"
    assert post(client, TASK, "k1").status_code == 503
    assert server.applied_counts() == {}


def test_fault_token_expiry_answers_401_and_rotates_the_token(
    client: httpx.Client, server: ReferenceServer
) -> None:
    server.faults.script = ["token_expiry"]
    assert post(client, TASK, "k1").status_code == 401
    assert server.token != TOKEN
    assert client.get("/tasks").status_code == 401


def test_rejected_ids_get_422_on_every_write(client: httpx.Client, server: ReferenceServer) -> None:
    server.faults.reject_ids = {"task_1"}
    answer = post(client, TASK, "k1")
    assert answer.status_code == 422
    assert post(client, {**TASK, "id": "task_2"}, "k2").status_code == 201


def test_keep_alive_reuses_one_connection(client: httpx.Client, server: ReferenceServer) -> None:
    for n in range(5):
        post(client, {**TASK, "id": f"task_{n}"}, f"k{n}")
    # One TCP connection served all of them: the pool holds exactly one.
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert len(pool.connections) == 1
    assert server.requests == 5


def test_server_runs_as_its_own_process_and_persists_to_a_file(tmp_path: Any) -> None:
    db = tmp_path / "server.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clinik_local.server",
            "--port",
            "0",
            "--db",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "CLINIK_TOKEN": "t"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:2] == ["listening", "on"]
        url = line[2]
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}) as c:
            assert post(c, TASK, "k1").status_code == 201
            assert c.get("/tasks/task_1").json()["data"]["id"] == "task_1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    with ReferenceServer(db=str(db), token="t") as again:
        assert set(again.tasks()) == {"task_1"}
        assert again.applied_counts() == {"k1": 1}
