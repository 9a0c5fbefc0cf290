"""A child process that bootstraps a store from the reference server until it is killed.

Usage: pull_child.py DB URL TOKEN [PULL_LIMIT]. Used by tests/test_sync_pull.py and
tests/test_sync_resume.py, which SIGKILL it once a listing page is committed.
"""

from __future__ import annotations

import sys

from clinik_local import SyncConfig, TaskStore


def main() -> None:
    path, url, token = sys.argv[1:4]
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    config = SyncConfig(
        base_url=url, token_provider=lambda: token, pull_limit=limit, backoff_base=0.01, timeout=5
    )
    with TaskStore.open(path, sync=config) as store:
        while True:
            store.sync.flush(timeout=60)


if __name__ == "__main__":
    main()
