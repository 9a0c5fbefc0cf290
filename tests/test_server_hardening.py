"""Every bad request gets the contract's error envelope and status, and the server keeps serving.

Issue 15 items 10 and 11: odd query values, broken framing (``Content-Length``,
chunked bodies), prefix routes, the reserved id ``changes``, use after ``stop()``,
loopback-only listening, a token that is never printed, and a database file only its
owner can read. Raw sockets where httpx would refuse to send the request.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local.cli import main as cli_main
from clinik_local.errors import ClinikError, ValidationError
from clinik_local.server import ReferenceServer, ServerStoppedError

TOKEN = "hardening-token"
TASK: dict[str, Any] = {"id": "task_1", "status": "requested", "intent": "order"}
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token=TOKEN) as srv:
        yield srv
        assert srv.internal_errors == []  # every bad request was handled, none crashed


@pytest.fixture
def client(server: ReferenceServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=5) as c:
        yield c


def exchange(
    server: ReferenceServer, request: bytes, timeout: float = 5
) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes, read one answer: (status, headers, parsed JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk
            body += chunk
    return status, headers, json.loads(body[:length])


def still_serves(client: httpx.Client) -> None:
    assert client.get("/tasks").status_code == 200


def post_raw(headers: str, body: bytes = b"", path: str = "/api/v1/tasks") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Idempotency-Key: k1\r\n{headers}\r\n"
    ).encode() + body


def assert_error(envelope: Any, code: str, field: str | None = None) -> None:
    assert set(envelope) == {"error"}
    assert envelope["error"]["code"] == code
    assert isinstance(envelope["error"]["message"], str)
    if field is not None:
        assert envelope["error"]["field"] == field


# --- item 10: bad requests --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/tasks?limit=%C2%B2", "limit"),  # "²": isdigit() is true, int() refuses it
        ("/tasks/changes?since=%C2%B2", "since"),
        (f"/tasks/changes?since={10**20}", "since"),
        ("/tasks/changes?limit=%C2%B2", "limit"),
    ],
)
def test_odd_limit_and_since_values_are_400_naming_the_field(
    client: httpx.Client, path: str, field: str
) -> None:
    answer = client.get(path)
    assert answer.status_code == 400
    assert_error(answer.json(), "bad_request", field)
    still_serves(client)


@pytest.mark.parametrize("length", ["abc", "-1", "1, 2", "0x10", "99999999999999999999999"])
def test_a_malformed_content_length_is_400_at_once_and_the_connection_closes(
    server: ReferenceServer, client: httpx.Client, length: str
) -> None:
    started = time.monotonic()
    status, headers, envelope = exchange(server, post_raw(f"Content-Length: {length}\r\n"), 5)
    assert status == 400
    assert_error(envelope, "bad_request")
    assert headers["connection"] == "close"
    assert time.monotonic() - started < 4  # answered, not left waiting for a body
    assert server.tasks() == {}
    still_serves(client)


def test_a_route_is_matched_whole_not_by_prefix(
    server: ReferenceServer, client: httpx.Client
) -> None:
    for path in ("/tasksXYZ", "/tasks/a/b", "/taskschanges"):
        answer = client.post(path, content=json.dumps(TASK), headers={"Idempotency-Key": path})
        assert answer.status_code == 404, path
        assert_error(answer.json(), "not_found")
    assert client.get("/tasksXYZ").status_code == 404
    assert server.tasks() == {}
    still_serves(client)


def test_a_wrong_method_is_405_with_allow(client: httpx.Client) -> None:
    answer = client.delete("/tasks/changes", headers={"Idempotency-Key": "k1"})
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "GET"
    assert_error(answer.json(), "method_not_allowed")
    patch = client.patch("/tasks/task_1", content=b"{}")
    assert patch.status_code == 405
    assert patch.headers["Allow"] == "GET, PUT, DELETE"
    still_serves(client)


def test_the_id_changes_is_refused_at_create_and_the_log_route_stays_the_log(
    server: ReferenceServer, client: httpx.Client
) -> None:
    answer = client.post(
        "/tasks", content=json.dumps({**TASK, "id": "changes"}), headers={"Idempotency-Key": "k1"}
    )
    assert answer.status_code == 422
    assert_error(answer.json(), "validation_error", "id")
    assert server.tasks() == {}
    with pytest.raises(ValidationError) as refused:
        server.put_task({**TASK, "id": "changes"})
    assert refused.value.paths == ("id",)
    assert client.get("/tasks/changes").json()["data"] == []


def test_a_chunked_body_is_read_as_the_task(server: ReferenceServer, client: httpx.Client) -> None:
    body = json.dumps(TASK).encode()
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    status, _, envelope = exchange(
        server, post_raw("Transfer-Encoding: chunked\r\n", chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
    )
    assert status == 201
    assert envelope["data"]["id"] == "task_1"
    assert set(server.tasks()) == {"task_1"}
    with_httpx = client.post(
        "/tasks",
        content=iter([json.dumps({**TASK, "id": "task_2"}).encode()]),  # streamed: chunked
        headers={"Idempotency-Key": "k2"},
    )
    assert with_httpx.status_code == 201


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ("Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n", 400, "bad_request"),
        ("Transfer-Encoding: chunked\r\n", b"2\r\n{}XX0\r\n\r\n", 400, "bad_request"),
        ("Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", b"{}", 400, "bad_request"),
        ("Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n", 501, "not_implemented"),
    ],
)
def test_a_malformed_or_ambiguous_chunked_body_is_refused_and_closed(
    server: ReferenceServer, client: httpx.Client, headers: str, body: bytes, status: int, code: str
) -> None:
    answer, answer_headers, envelope = exchange(server, post_raw(headers, body))
    assert answer == status
    assert_error(envelope, code)
    assert answer_headers["connection"] == "close"
    assert server.tasks() == {}
    still_serves(client)


def test_a_body_over_one_mebibyte_is_413_by_length_or_chunked(
    server: ReferenceServer, client: httpx.Client
) -> None:
    big = json.dumps({**TASK, "note": "x" * (1 << 20)}).encode()
    status, _headers, envelope = exchange(server, post_raw(f"Content-Length: {len(big)}\r\n", big))
    assert status == 413
    assert_error(envelope, "too_large")
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
    status, _, envelope = exchange(server, post_raw("Transfer-Encoding: chunked\r\n", chunked))
    assert status == 413
    assert_error(envelope, "too_large")
    at_the_cap = json.dumps({**TASK, "note": "x" * ((1 << 20) - 200)}).encode()
    at_the_cap += b" " * ((1 << 20) - len(at_the_cap))
    assert len(at_the_cap) == 1 << 20
    read = client.post("/tasks", content=at_the_cap, headers={"Idempotency-Key": "k2"})
    assert read.status_code == 422  # read and judged (the note is over its own limit)
    assert read.json()["error"]["field"] == "note"
    assert server.tasks() == {}
    still_serves(client)


def test_http_level_refusals_are_envelopes_too(
    server: ReferenceServer, client: httpx.Client
) -> None:
    status, _, envelope = exchange(server, b"GARBAGE\r\n\r\n")
    assert status == 400
    assert_error(envelope, "bad_request")
    status, _, envelope = exchange(
        server, b"GET /api/v1/tasks HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    )
    assert status in {400, 431}
    assert "error" in envelope
    status, _, envelope = exchange(server, f"GET /api/v1/{'a' * 70000} HTTP/1.1\r\n\r\n".encode())
    assert status == 414
    assert_error(envelope, "uri_too_long")
    deep = client.post("/tasks", content=b"[" * 100_000, headers={"Idempotency-Key": "k1"})
    assert deep.status_code == 400
    still_serves(client)


def test_the_test_api_after_stop_raises_the_servers_own_error() -> None:
    server = ReferenceServer(token=TOKEN).start()
    server.stop()
    for call in (server.tasks, server.applied_counts, server.changes_cursor):
        with pytest.raises(ServerStoppedError):
            call()
    with pytest.raises(ClinikError):
        server.put_task(TASK)
    server.stop()  # twice is harmless
    with pytest.raises(ServerStoppedError):
        server.start()


# A request made of random parts: never a crash, always an envelope or a closed socket.
PARTS = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "G\x00T"]),
    st.sampled_from(
        ["/api/v1/tasks", "/api/v1/tasks/changes", "/api/v1/tasks/t1", "/x", "/api/v1/tasks/%00"]
    ),
    st.sampled_from(["", "?limit=5", "?since=%FF", "?status=,", "?limit=10000", "?cursor=%20"]),
    st.sampled_from(
        ["", "Content-Length: 5\r\n", "Content-Length: x\r\n", "Transfer-Encoding: chunked\r\n"]
    ),
    st.binary(max_size=40),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=PARTS)
def test_random_bad_requests_never_crash_the_server(
    server: ReferenceServer, client: httpx.Client, parts: tuple[str, str, str, str, bytes]
) -> None:
    method, path, query, framing, body = parts
    request = (
        f"{method} {path}{query} HTTP/1.1\r\nHost: x\r\n{AUTH}Idempotency-Key: fuzz\r\n{framing}"
        "Connection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if data:  # an answer is always a JSON envelope; a short body may end without one
        head, _, payload = data.partition(b"\r\n\r\n")
        assert b"application/json" in head
        assert "error" in json.loads(payload) or "data" in json.loads(payload)
    assert server.internal_errors == []
    still_serves(client)


# --- item 11: loopback only, no printed token, private files ----------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.org"])
def test_a_non_loopback_host_is_refused_before_listening(host: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ReferenceServer(host=host)
    assert refused.value.paths == ("host",)


def test_serve_refuses_a_non_loopback_host_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLINIK_TOKEN", "t")
    assert cli_main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "host" in err
    assert "loopback" in err
    assert "Traceback" not in err


def test_serve_without_a_token_refuses_and_names_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLINIK_TOKEN", raising=False)
    assert cli_main(["serve", "--port", "0"]) == 2
    assert "CLINIK_TOKEN" in capsys.readouterr().err


def test_localhost_and_any_127_address_are_loopback() -> None:
    for host in ("localhost", "127.0.0.2"):
        with ReferenceServer(host=host, token=TOKEN) as server:
            assert server.url.startswith(f"http://{host}:")


def _serve(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinik_local.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out


def test_serve_never_prints_the_token_and_a_token_file_is_0600(tmp_path: Path) -> None:
    env_token = "secret-from-env"
    proc, line = _serve([], {"CLINIK_TOKEN": env_token})
    try:
        url = line.split()[2]
        assert (
            httpx.get(f"{url}/tasks", headers={"Authorization": f"Bearer {env_token}"}).status_code
            == 200
        )
    finally:
        out = line + _stop(proc)
    assert env_token not in out
    token_file = tmp_path / "token"
    env = {k: v for k, v in os.environ.items() if k != "CLINIK_TOKEN"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clinik_local.cli",
            "serve",
            "--port",
            "0",
            "--token-file",
            str(token_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        token = token_file.read_text().strip()
        assert len(token) >= 20
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        url = line.split()[2]
        assert (
            httpx.get(f"{url}/tasks", headers={"Authorization": f"Bearer {token}"}).status_code
            == 200
        )
    finally:
        out = line + _stop(proc)
    assert token not in out


def test_the_server_database_and_its_wal_are_created_0600(tmp_path: Path) -> None:
    db = tmp_path / "server.db"
    old = os.umask(0o022)
    try:
        with ReferenceServer(token=TOKEN, db=str(db)) as server:
            server.put_task(TASK)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert modes["server.db"] == 0o600
    assert modes.get("server.db-wal", 0o600) == 0o600
