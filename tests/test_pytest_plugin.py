"""The pytest plugin's fixtures, exercised in inner pytest runs (pytester)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

_ARGS = ("-p", "no:cacheprovider", "-W", "error")


def test_task_store_gives_each_test_a_fresh_empty_store(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(3))
        def test_fresh(task_store, n):
            assert task_store.tasks.count().data == 0
            task_store.tasks.create({"status": "draft", "intent": "order", "id": "same_id"})
            assert task_store.tasks.count().data == 1

        def test_closed_after_use(task_store, request):
            request.config.stash_store = task_store

        def test_previous_store_was_closed(request):
            assert request.config.stash_store.closed
        """
    )
    result = pytester.runpytest(*_ARGS)
    result.assert_outcomes(passed=5)


def test_task_factory_builds_valid_unique_requests_with_overrides(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_factory(task_store, task_factory):
            requests = task_factory.many(50)
            assert len({r["id"] for r in requests}) == 50
            created = task_store.tasks.create_many(requests).data
            assert [t.id for t in created] == [r["id"] for r in requests]

        def test_overrides(task_store, task_factory):
            request = task_factory(status="draft", priority=None, note="hello")
            assert "priority" not in request
            task = task_store.tasks.create(request).data
            assert task.status.value == "draft"
            assert task.priority is None
            assert task.note == "hello"

        def test_ids_unique_across_tests(task_factory):
            assert task_factory()["id"] != "task_000001"
        """
    )
    result = pytester.runpytest(*_ARGS)
    result.assert_outcomes(passed=3)


def test_remote_server_accepts_a_real_sync_and_stops_after_the_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import httpx
        import pytest
        from clinik_local import SyncConfig, TaskStore

        URLS = []

        def test_sync_to_remote(remote_server, task_factory):
            URLS.append(remote_server.url)
            config = SyncConfig(
                base_url=remote_server.url, token_provider=lambda: remote_server.token
            )
            request = task_factory()
            with TaskStore.open(":memory:", sync=config) as store:
                store.tasks.create(request)
                assert store.sync.flush(10)
            headers = {"Authorization": f"Bearer {remote_server.token}"}
            reply = httpx.get(f"{remote_server.url}/tasks/{request['id']}", headers=headers)
            assert reply.status_code == 200
            assert reply.json()["data"]["id"] == request["id"]

        def test_server_is_gone_afterwards():
            with pytest.raises(httpx.TransportError):
                httpx.get(URLS[0] + "/tasks", timeout=2)
        """
    )
    result = pytester.runpytest(*_ARGS)
    result.assert_outcomes(passed=2)


def test_fixture_failures_are_reported_as_test_failures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from clinik_local import ValidationError
        import pytest

        def test_bad_override_is_refused(task_store, task_factory):
            with pytest.raises(ValidationError):
                task_store.tasks.create(task_factory(status="bogus"))

        def test_deliberate_failure(task_store):
            assert task_store.tasks.count().data == 1
        """
    )
    result = pytester.runpytest(*_ARGS)
    result.assert_outcomes(passed=1, failed=1)


def _setup_seconds(pytester: pytest.Pytester, fixture: str) -> float:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.fixture
        def nothing():
            yield None

        @pytest.mark.parametrize("n", range(1000))
        def test_uses_fixture({fixture}, n):
            assert {fixture} is None or {fixture}.tasks is not None
        """
    )
    reprec = pytester.inline_run(*_ARGS, "-q")
    reprec.assertoutcome(passed=1000)
    reports = reprec.getreports("pytest_runtest_logreport")
    setups = [r.duration for r in reports if r.when == "setup"]
    assert len(setups) == 1000
    return sum(setups)


def test_thousand_tests_using_task_store_measure_setup_cost(pytester: pytest.Pytester) -> None:
    """Reports the set-up time of 1,000 tests using task_store, against a no-op fixture."""
    baseline = _setup_seconds(pytester, "nothing")
    with_store = _setup_seconds(pytester, "task_store")
    print(
        f"\n1000 set-ups: task_store {with_store:.3f} s, no-op fixture {baseline:.3f} s, "
        f"store share {with_store - baseline:.3f} s"
    )
    assert with_store > 0
