"""Hostile settings and arguments: every keyword of SyncConfig, of the remotes and of
TaskStore.open, checked when the settings are made; the ids the sync engine's calls take.

Before, a float ``lanes`` escaped as a TypeError, a missing ``ca_bundle`` file as a
FileNotFoundError from ``run_once``, a float ``batch_size`` as a "datatype mismatch"
StorageError, ``http_transport="x"`` parked the change as a dead letter and then made
``close()`` raise AttributeError, and ``allow_insecure_http="no"`` (a truthy string)
switched plain http on; ``TaskStore.open(None)`` was a TypeError, ``open("a\\x00b")`` a
ValueError, ``open(path, sync="https://...")`` an AttributeError; ``sync.retry([])`` a
TypeError and ``count(at_most=2**64)`` an OverflowError. Now each is a ValidationError
naming the setting or argument, raised before anything is written, and a setting that
is accepted never makes the sync worker raise anything but the library's own errors.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import (
    ClinikError,
    FhirR4Remote,
    SyncConfig,
    TaskStore,
    ValidationError,
)
from clinik_local.remotes.clinik import ClinikRemote

#: A task with no references (a FHIR remote without a reference map can send it).
UNREFERENCED = {"status": "requested", "intent": "order", "description": "draw blood"}


def _token() -> str:
    return "token"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def base_url() -> str:
    return f"http://127.0.0.1:{_closed_port()}/api"


def _sync_config(url: str, **settings_: Any) -> SyncConfig:
    return SyncConfig(base_url=url, token_provider=_token, **settings_)


def _clinik(url: str, **settings_: Any) -> ClinikRemote:
    return ClinikRemote(url, settings_.pop("token_provider", _token), **settings_)


def _fhir(url: str, **settings_: Any) -> FhirR4Remote:
    return FhirR4Remote(url, settings_.pop("token_provider", _token), **settings_)


MAKERS: dict[str, Callable[..., object]] = {
    "SyncConfig": _sync_config,
    "ClinikRemote": _clinik,
    "FhirR4Remote": _fhir,
}

#: The settings each maker takes beside the URL (token_provider for the remotes too).
SETTINGS = {
    "SyncConfig": [
        "timeout",
        "batch_size",
        "lanes",
        "backoff_base",
        "backoff_cap",
        "max_retry_after",
        "allow_insecure_http",
        "ca_bundle",
        "jitter_seed",
        "pull",
        "pull_interval",
        "pull_limit",
        "on_conflict",
        "scope",
    ],
    "ClinikRemote": [
        "token_provider",
        "timeout",
        "allow_insecure_http",
        "ca_bundle",
        "lanes",
        "http_transport",
    ],
    "FhirR4Remote": [
        "token_provider",
        "create",
        "reference_map",
        "overlap",
        "reconcile_every",
        "timeout",
        "allow_insecure_http",
        "ca_bundle",
        "lanes",
        "http_transport",
    ],
}

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
    st.sampled_from(["/nonexistent/ca.pem", "", ".", "yes", "no", "0", "2.5", "nan"]),
    st.sampled_from([object(), httpx.MockTransport(lambda r: httpx.Response(500)), _token]),
)


def _named(error: ValidationError, field: str) -> bool:
    return any(path.split(".")[0].split("[")[0] == field for path in error.paths)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_a_hostile_setting_is_refused_naming_it_or_accepted(base_url: str, data: Any) -> None:
    maker = data.draw(st.sampled_from(sorted(MAKERS)))
    field = data.draw(st.sampled_from(SETTINGS[maker]))
    value = data.draw(HOSTILE)
    refused: ValidationError | None = None
    try:
        MAKERS[maker](base_url, **{field: value})
    except ValidationError as exc:
        refused = exc
    except Exception as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"{maker}({field}={value!r}) raised {type(exc).__name__}: {exc}")
    if refused is not None:
        assert _named(refused, field), (maker, field, value, refused.paths)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_an_accepted_setting_never_makes_the_sync_worker_raise_a_foreign_error(
    data: Any,
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/api"
    use_fhir = data.draw(st.booleans())
    fields = SETTINGS["FhirR4Remote" if use_fhir else "SyncConfig"]
    field = data.draw(st.sampled_from([f for f in fields if f != "token_provider"]))
    value = data.draw(HOSTILE)
    try:
        if use_fhir:
            config = SyncConfig(remote=_fhir(url, **{field: value}), pull=False)
        else:
            config = _sync_config(url, **{field: value})
    except ValidationError:
        return
    store = TaskStore.open(":memory:", sync=config)
    try:
        store.tasks.create(UNREFERENCED)
        status = store.sync.run_once()
        # Nothing was reached, so nothing is delivered and nothing is dead: the change waits.
        assert status.pending + status.in_flight == 1, (field, value, status)
        assert status.dead == 0, (field, value, status)
    except ClinikError:
        pass
    finally:
        store.close()


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_a_ca_bundle_that_is_missing_or_not_pem_is_refused_naming_ca_bundle(
    maker: str, base_url: str, tmp_path: Path
) -> None:
    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("this is not a certificate\n")
    for bad in (tmp_path / "missing.pem", garbage, tmp_path, 5, b"/etc/ssl"):
        with pytest.raises(ValidationError) as caught:
            MAKERS[maker](base_url, ca_bundle=bad)
        assert caught.value.paths == ("ca_bundle",), bad


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_a_real_ca_bundle_is_accepted_as_text_or_as_a_path(maker: str, base_url: str) -> None:
    MAKERS[maker](base_url, ca_bundle=certifi.where())
    MAKERS[maker](base_url, ca_bundle=Path(certifi.where()))


def test_a_path_ca_bundle_is_kept_as_text_in_the_config(base_url: str) -> None:
    config = _sync_config(base_url, ca_bundle=Path(certifi.where()))
    assert config.ca_bundle == certifi.where()


@pytest.mark.parametrize("maker", sorted(MAKERS))
@pytest.mark.parametrize("truthy", ["no", "false", 1, [True]])
def test_a_truthy_non_bool_never_switches_plain_http_on(maker: str, truthy: object) -> None:
    with pytest.raises(ValidationError) as caught:
        MAKERS[maker]("http://clinic.example/api", allow_insecure_http=truthy)
    assert caught.value.paths == ("allow_insecure_http",)


@pytest.mark.parametrize("maker", sorted(MAKERS))
@pytest.mark.parametrize("lanes", [2.5, 2.0, "2", math.nan, 0, 17, True])
def test_lanes_must_be_a_whole_number_from_1_to_16(
    maker: str, base_url: str, lanes: object
) -> None:
    with pytest.raises(ValidationError) as caught:
        MAKERS[maker](base_url, lanes=lanes)
    assert caught.value.paths == ("lanes",)


@pytest.mark.parametrize("field", ["batch_size", "pull_limit"])
def test_batch_size_and_pull_limit_must_be_whole_numbers(base_url: str, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _sync_config(base_url, **{field: 2.5})
    assert caught.value.paths == (field,)


@pytest.mark.parametrize("maker", ["ClinikRemote", "FhirR4Remote"])
def test_a_remote_refuses_an_http_transport_that_is_not_one(maker: str, base_url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        MAKERS[maker](base_url, http_transport="x")
    assert caught.value.paths == ("http_transport",)


def test_fhir_reconcile_every_may_be_infinite_but_never_nan(base_url: str) -> None:
    assert _fhir(base_url, reconcile_every=math.inf).reconcile_every == math.inf
    with pytest.raises(ValidationError) as caught:
        _fhir(base_url, reconcile_every=math.nan)
    assert caught.value.paths == ("reconcile_every",)


OPEN_SETTINGS = ["path", "durability", "busy_timeout", "sync", "key"]


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(OPEN_SETTINGS), value=HOSTILE)
def test_open_refuses_a_hostile_argument_naming_it_and_creates_no_file(
    tmp_path_factory: pytest.TempPathFactory, field: str, value: object
) -> None:
    folder = tmp_path_factory.mktemp("open")
    arguments: dict[str, Any] = {"path": folder / "store.db", field: value}
    if field == "path" and isinstance(value, str) and value not in ("", ":memory:"):
        arguments["path"] = folder / value.replace("/", "_")  # never outside tmp
    refused: ClinikError | None = None
    try:
        TaskStore.open(**arguments).close()
    except ClinikError as exc:
        refused = exc
    except Exception as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"open({field}={value!r}) raised {type(exc).__name__}: {exc}")
    if isinstance(refused, ValidationError):
        assert _named(refused, field), (field, value, refused.paths)
    if refused is not None:
        assert list(folder.iterdir()) == [], (field, value, refused)


@pytest.mark.parametrize("path", [None, 5, b"store.db", ["store.db"], "a\x00b.db"])
def test_open_refuses_a_path_that_is_no_path_naming_path(path: object) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskStore.open(path)  # type: ignore[arg-type]
    assert caught.value.paths == ("path",)


@pytest.mark.parametrize("sync", [True, "https://clinic.example/api", {"base_url": "x"}])
def test_open_refuses_a_sync_that_is_no_sync_config_naming_sync(
    tmp_path: Path, sync: object
) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskStore.open(tmp_path / "store.db", sync=sync)  # type: ignore[arg-type]
    assert caught.value.paths == ("sync",)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def syncing_store() -> Iterator[TaskStore]:
    config = SyncConfig(base_url=f"http://127.0.0.1:{_closed_port()}/api", token_provider=_token)
    store = TaskStore.open(":memory:", sync=config)
    store.tasks.create(UNREFERENCED)
    yield store
    store.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(method=st.sampled_from(["retry", "discard", "resolve"]), value=HOSTILE)
def test_an_engine_call_with_a_hostile_id_raises_only_clinik_errors_naming_it(
    syncing_store: TaskStore, method: str, value: object
) -> None:
    engine = syncing_store.sync
    name = "task_id" if method == "resolve" else "change_id"
    refused: ClinikError | None = None
    try:
        if method == "resolve":
            engine.resolve(value, "local")  # type: ignore[arg-type]
        else:
            getattr(engine, method)(value)
    except ClinikError as exc:
        refused = exc
    except Exception as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"{method}({value!r}) raised {type(exc).__name__}: {exc}")
    if not isinstance(value, str):
        assert isinstance(refused, ValidationError), (method, value, refused)
        assert refused.paths == (name,)


@pytest.mark.parametrize("at_most", [2**63, 10**30])
def test_a_count_bound_beyond_sqlite_integers_is_refused_naming_at_most(
    syncing_store: TaskStore, at_most: int
) -> None:
    with pytest.raises(ValidationError) as caught:
        syncing_store.tasks.count(at_most=at_most)
    assert caught.value.paths == ("at_most",)
    assert syncing_store.tasks.count(at_most=2**63 - 1).data == 1


@pytest.mark.parametrize("callback", [None, 5, "print", object()])
def test_a_status_callback_that_cannot_be_called_is_refused_when_subscribed(
    syncing_store: TaskStore, callback: object
) -> None:
    with pytest.raises(ValidationError) as caught:
        syncing_store.sync.on_status_change(callback)  # type: ignore[arg-type]
    assert caught.value.paths == ("callback",)
