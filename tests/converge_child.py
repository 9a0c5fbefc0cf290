"""One device's sync engine in its own process, for the convergence test to SIGKILL.

Usage: ``converge_child.py DB URL TOKEN SCOPE_JSON``. The child opens the file store with
two-way sync on ``SCOPE_JSON`` (``null``: every task), small pages (so a bootstrap and a
log read span several requests) and quick backoff, prints ``ready``, then serves one
command per line on stdin: ``flush SECONDS`` runs ``store.sync.flush`` on this thread and
prints ``done True|False``; ``exit`` closes the store. tests/test_convergence.py kills it
with SIGKILL at random points of a flush (mid-bootstrap, mid-page, mid-push), while the
test process edits the same file between syncs. Only this child runs an engine on the
file while it lives.
"""

from __future__ import annotations

import json
import sys

from clinik_local import SyncConfig, TaskStore


def main() -> None:
    path, url, token, scope_text = sys.argv[1:5]
    config = SyncConfig(
        base_url=url,
        token_provider=lambda: token,
        scope=json.loads(scope_text),
        pull_limit=1,
        backoff_base=0.001,
        backoff_cap=0.01,
        timeout=2.0,
        pull_interval=0.05,
    )
    with TaskStore.open(path, sync=config) as store:
        print("ready", flush=True)
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "exit":
                break
            if command[0] == "flush":
                done = store.sync.flush(timeout=float(command[1]))
                print(f"done {done}", flush=True)


if __name__ == "__main__":
    main()
