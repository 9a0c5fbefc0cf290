"""Security: private files, a token that never leaves memory, TLS always verified, plain
http only to loopback, and size limits on every text field and list.

(Mode 0600 of the store file and its -wal/-shm is in ``tests/test_files.py``.)
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from clinik_local import (
    MAX_LIST_ITEMS,
    TEXT_LIMITS,
    ReferenceServer,
    SyncConfig,
    TaskStore,
    ValidationError,
)

SECRET = "tok-S3CR3T-never-store-me-0123456789"


def _scan(needle: str, haystacks: dict[str, str | bytes]) -> list[str]:
    """Names of the places the needle shows up in (as text or as UTF-8 bytes)."""
    raw = needle.encode()
    return [
        name
        for name, hay in haystacks.items()
        if (raw in hay if isinstance(hay, bytes) else needle in hay)
    ]


def _log_text(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) for r in records)


def test_the_bearer_token_never_reaches_the_file_the_outbox_errors_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    path = tmp_path / "synced.db"
    with ReferenceServer(token=SECRET) as server:
        leak = [False]

        def provider() -> str:
            if leak[0]:  # a provider failing with the token in its message
                raise RuntimeError(f"vault said {SECRET}")
            return SECRET

        config = SyncConfig(
            base_url=server.url,
            token_provider=provider,
            backoff_base=0.001,
            backoff_cap=0.01,
            timeout=5,
        )
        with TaskStore.open(path, sync=config) as store:
            for n in range(5):
                store.tasks.create({"id": f"s{n}", "status": "requested", "intent": "order"})
            store.tasks.update("s1", {"note": "changed"})
            store.tasks.delete("s2")
            assert store.sync.flush(timeout=30)
            assert sorted(server.tasks()) == ["s0", "s1", "s3", "s4"]  # the token worked
            # The server stops taking it: refused (401), asked again, refused: auth_required.
            server.expire_token()
            store.tasks.create({"id": "s9", "status": "requested", "intent": "order"})
            refused = store.sync.run_once()
            assert refused.state == "auth_required"
            leak[0] = True
            failed = store.sync.run_once()  # asks the provider again: it raises
            assert failed.state == "auth_required"
            places: dict[str, str | bytes] = {
                "status after 401": repr(refused),
                "status after provider failure": repr(failed),
                "config repr": repr(config),
                "dead letters": repr(store.sync.dead_letters()),
                "conflicts": repr(store.sync.conflicts()),
            }
            with store.read() as conn:
                places["outbox rows"] = repr(conn.execute("SELECT * FROM outbox").fetchall())
    for file in tmp_path.iterdir():  # the store and any -wal/-shm left
        places[file.name] = file.read_bytes()
    places["logs"] = _log_text(caplog.records)
    assert len(caplog.records) > 0  # logging was captured (httpx logs each request)
    assert _scan(SECRET, places) == []


def test_tls_cannot_be_switched_off_by_a_keyword() -> None:
    names = {field.name for field in attrs.fields(SyncConfig)}
    assert not names & {"verify", "verify_ssl", "ssl_verify", "tls_verify", "insecure", "ssl"}
    with pytest.raises(TypeError):
        SyncConfig(  # type: ignore[call-arg]
            base_url="https://clinic.example/api/v1", token_provider=lambda: "t", verify=False
        )


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (openssl CLI)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


class _TlsServer:
    """Accepts TLS connections on 127.0.0.1 and answers 503; counts good handshakes."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.failed = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._stopping:
                conn.close()
                return
            with conn:
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        self.handshakes += 1
                        tls.recv(65536)
                        tls.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
                except (ssl.SSLError, OSError):
                    self.failed += 1

    def close(self) -> None:
        self._stopping = True
        socket.create_connection(("127.0.0.1", self.port)).close()  # wakes accept()
        self._thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def tls_server(self_signed: tuple[Path, Path]) -> Iterator[_TlsServer]:
    server = _TlsServer(*self_signed)
    yield server
    server.close()


def _one_pass(path: Path, config: SyncConfig) -> Any:
    with TaskStore.open(path, sync=config) as store:
        store.tasks.create({"id": "t1", "status": "requested", "intent": "order"})
        return store.sync.run_once()


def test_an_untrusted_certificate_is_refused_and_trusting_it_takes_a_ca_bundle(
    tmp_path: Path, tls_server: _TlsServer, self_signed: tuple[Path, Path]
) -> None:
    url = f"https://127.0.0.1:{tls_server.port}/api/v1"
    refused = _one_pass(
        tmp_path / "a.db", SyncConfig(base_url=url, token_provider=lambda: "t", timeout=5)
    )
    assert refused.pending == 1  # nothing was sent
    assert tls_server.handshakes == 0
    assert tls_server.failed >= 1
    assert refused.state == "offline"  # (its last_error does not say why: see the report)
    trusted = _one_pass(
        tmp_path / "b.db",
        SyncConfig(
            base_url=url, token_provider=lambda: "t", timeout=5, ca_bundle=str(self_signed[0])
        ),
    )
    assert tls_server.handshakes >= 1  # the same server, now trusted: the handshake passes
    assert trusted.pending == 1  # (it answered 503: kept for a retry)


@pytest.mark.parametrize(
    "url",
    [
        "http://clinic.example/api/v1",
        "http://10.0.0.5:8080/api/v1",
        "http://192.168.1.20/api",
        "http://localhost.evil.example/api",
        "http://127.0.0.1.nip.io/api",
        "http://[2001:db8::1]/api",
    ],
)
def test_plain_http_is_refused_for_a_non_loopback_host(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        SyncConfig(base_url=url, token_provider=lambda: "t")
    assert caught.value.paths == ("base_url",)
    allowed = SyncConfig(base_url=url, token_provider=lambda: "t", allow_insecure_http=True)
    assert allowed.base_url == url
    assert allowed.allow_insecure_http is True


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/api/v1", "http://[::1]:8080/api", "http://localhost:9/api"]
)
def test_plain_http_to_loopback_is_allowed(url: str) -> None:
    assert SyncConfig(base_url=url, token_provider=lambda: "t").base_url == url


@pytest.mark.parametrize("field", sorted(f for f in TEXT_LIMITS if f not in ("type",)))
def test_every_text_field_has_a_size_limit(field: str) -> None:
    limit = TEXT_LIMITS[field]
    with TaskStore.open(":memory:") as store:
        request: dict[str, Any] = {"status": "draft", "intent": "order"}
        if field.startswith("value"):
            at = {**request, "input": [{"type": "t", field: "x" * limit}]}
            over = {**request, "input": [{"type": "t", field: "x" * (limit + 1)}]}
            path = f"input[0].{field}"
        else:
            at, over, path = (
                {**request, field: "x" * limit},
                {**request, field: "x" * (limit + 1)},
                field,
            )
        store.tasks.create(at)
        before = store.table_counts()
        with pytest.raises(ValidationError) as caught:
            store.tasks.create(over)
        assert caught.value.paths == (path,)
        assert store.table_counts() == before


@pytest.mark.parametrize("field", ["basedOn", "partOf", "input", "output", "restriction.recipient"])
def test_every_list_has_a_size_limit(field: str) -> None:
    def items(count: int) -> list[Any]:
        if field in ("input", "output"):
            return [{"type": "t", "valueString": str(n)} for n in range(count)]
        return [f"id{n}" for n in range(count)]

    def request(count: int) -> dict[str, Any]:
        base: dict[str, Any] = {"status": "draft", "intent": "order"}
        if field == "restriction.recipient":
            base["restriction"] = {"recipient": items(count)}
        else:
            base[field] = items(count)
        return base

    with TaskStore.open(":memory:") as store:
        store.tasks.create(request(MAX_LIST_ITEMS))
        with pytest.raises(ValidationError) as caught:
            store.tasks.create(request(MAX_LIST_ITEMS + 1))
        assert caught.value.paths == (field,)
        assert store.table_counts()["tasks"] == 1


def test_ids_have_a_size_limit() -> None:
    with TaskStore.open(":memory:") as store:
        store.tasks.create({"id": "i" * 64, "status": "draft", "intent": "order"})
        for field in ("id", "patientId", "ownerId", "focusId"):
            with pytest.raises(ValidationError) as caught:
                store.tasks.create({field: "i" * 65, "status": "draft", "intent": "order"})
            assert caught.value.paths == (field,)
