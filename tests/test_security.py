"""Issue 7 security: the bearer token never reaches the database, exceptions or logs;
TLS verification cannot be switched off; plain http only to loopback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clinik_local import ReferenceServer, SyncConfig, TaskStore, ValidationError

SECRET = "tok-9f8e7d6c5b4a-SECRET"


def test_token_is_never_in_the_store_file_exceptions_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "clinic.db"
    errors: list[str] = []
    with ReferenceServer(token=SECRET) as server:
        server.faults.reject_ids.add("task_rejected")
        config = SyncConfig(base_url=server.url, token_provider=lambda: SECRET, backoff_base=0.01)
        with TaskStore.open(path, sync=config) as store:
            for n in range(20):
                store.tasks.create({"status": "requested", "intent": "order", "note": f"n{n}"})
            store.tasks.create({"id": "task_rejected", "status": "draft", "intent": "order"})
            assert store.sync.flush(timeout=30)
            assert len(store.sync.dead_letters()) == 1
            errors.extend(str(d) for d in store.sync.dead_letters())
            errors.append(repr(store.sync.status()))
            errors.append(repr(config))
            server.expire_token()  # the provider's token is now refused: auth errors
            store.tasks.create({"status": "requested", "intent": "order"})
            store.sync.run_once()
            status = store.sync.status()
            assert status.state == "auth_required"
            errors.append(repr(status))
    files = [p for p in tmp_path.iterdir() if p.name.startswith("clinic.db")]
    assert files
    for file in files:
        assert SECRET.encode() not in file.read_bytes(), file.name
    assert all(SECRET not in text for text in errors)
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    assert all(SECRET not in (record.exc_text or "") for record in caplog.records)


def test_plain_http_is_refused_for_non_loopback_hosts() -> None:
    for url in ("http://clinic-host/api/v1", "http://10.0.0.5/api/v1", "http://example.org/x"):
        with pytest.raises(ValidationError) as caught:
            SyncConfig(base_url=url, token_provider=lambda: "t")
        assert "base_url" in caught.value.paths
    for url in ("http://127.0.0.1:8080/api/v1", "http://localhost/api", "https://clinic-host/api"):
        SyncConfig(base_url=url, token_provider=lambda: "t")


def test_tls_verification_has_no_off_switch() -> None:
    with pytest.raises(TypeError):
        SyncConfig(  # type: ignore[call-arg]
            base_url="https://clinic-host/api/v1", token_provider=lambda: "t", verify=False
        )
