"""Child process for the rekey crash test: open a store and rekey it, once.

argv: PATH OLD NEW, each key a string or "-" for none (plaintext). Prints "rekeying"
(flushed) just before the rekey starts, then "done SECONDS" after it (how long the rekey
took), so the parent can SIGKILL it at a random moment in between.
"""

from __future__ import annotations

import sys
import time

from clinik_local import KeyProvider, TaskStore


def _provider(text: str) -> KeyProvider | None:
    return None if text == "-" else (lambda: text)


def main() -> None:
    path, old, new = sys.argv[1:4]
    with TaskStore.open(path, key=_provider(old)) as store:
        print("rekeying", flush=True)
        started = time.perf_counter()
        store.rekey(_provider(new))
        print(f"done {time.perf_counter() - started:.4f}", flush=True)


if __name__ == "__main__":
    main()
