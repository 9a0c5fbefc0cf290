"""Which b-tree each page a single ``store.tasks.create`` commits belongs to (issue 16).

    python benchmarks/bench_pages.py                  # 30,000 tasks, 50 creates
    python benchmarks/bench_pages.py --tasks 100000
    python benchmarks/bench_pages.py --quick          # CI smoke run

A WAL commit writes every page it changed as one frame (a header and the page, with
their own write calls), so on a file store with synchronous=NORMAL the pages per commit
are most of what a single create costs. This census fills a store with ``--tasks``
tasks (``create_many``, chunks of 5,000, as bench_store does), then makes ``--samples``
single creates; after each, it reads the frames of the last commit straight from the
``-wal`` file (the page number in each frame header, from the previous commit frame to
the last one) and maps each page to its b-tree with the ``dbstat`` virtual table, read
on a connection of its own (a page dbstat does not list is the file header page 1, a
freelist page, or a page freed by the commit itself). The same census runs on the
hand-written anchor of bench_store (its six-index table and outbox, raw apsw), so the
totals are read against it. Printed: mean pages per create for each b-tree (sorted by
pages), the total, and the anchor's total.
"""

from __future__ import annotations

import argparse
import collections
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import apsw
from bench_store import (
    _ANCHOR_OUTBOX,
    _ANCHOR_TASK,
    anchor_bulk,
    anchor_row,
    open_anchor,
    prepared_rows,
)

from clinik_local import TaskStore
from clinik_local.demo import SEED_LAB_ORDER, generate_requests
from clinik_local.ids import new_change_id

_WAL_HEADER = 32
_FRAME_HEADER = 24


def last_commit_pages(wal: Path) -> list[tuple[int, bytes]]:
    """(page number, page image) of each frame of the last commit in a WAL file.

    Frames belong to the WAL's current generation when their salts equal the header's
    (a WAL restarted after a checkpoint keeps stale frames of the old generation past its
    end, with other salts); a commit frame has a non-zero database size.
    """
    data = wal.read_bytes()
    if len(data) < _WAL_HEADER:
        return []
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    frame = _FRAME_HEADER + page_size
    commits: list[int] = []  # index of each commit frame
    pages: list[tuple[int, bytes]] = []
    offset = _WAL_HEADER
    while offset + frame <= len(data):
        pgno, size = struct.unpack(">II", data[offset : offset + 8])
        if data[offset + 8 : offset + 16] != salts:
            break
        pages.append((pgno, data[offset + _FRAME_HEADER : offset + frame]))
        if size:
            commits.append(len(pages) - 1)
        offset += frame
    if not commits:
        return []
    start = commits[-2] + 1 if len(commits) > 1 else 0
    return pages[start : commits[-1] + 1]


def page_owners(path: Path) -> dict[int, str]:
    """Page number -> the b-tree (table or index name) dbstat says it belongs to."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {int(p): str(n) for n, p in conn.execute("SELECT name, pageno FROM dbstat")}
    finally:
        conn.close()


def unlisted(pgno: int, image: bytes) -> str:
    """What a committed page dbstat does not list is: freed or a freelist trunk."""
    if pgno == 1:
        return "(page 1: file header, sqlite_schema)"
    if not image.strip(b"\0"):
        # secure_delete (on in this SQLite build) zeroes every page it frees.
        return "(freed page, zeroed)"
    return "(freelist trunk)"


def census(path: Path, create: Callable[[], object], samples: int) -> collections.Counter[str]:
    """Pages per b-tree summed over ``samples`` creates, each committed alone."""
    wal = path.with_name(path.name + "-wal")
    total: collections.Counter[str] = collections.Counter()
    for _ in range(samples):
        create()
        pages = last_commit_pages(wal)
        owners = page_owners(path)
        for pgno, image in pages:
            owner = owners.get(pgno) if pgno != 1 else None
            total[owner or unlisted(pgno, image)] += 1
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    args = parser.parse_args()
    count, samples = (2000, 10) if args.quick else (args.tasks, args.samples)
    chunk = 5000

    with tempfile.TemporaryDirectory() as tmp:
        requests = list(generate_requests(count, seed=11))
        ours_path = Path(tmp) / "ours.db"
        store = TaskStore.open(ours_path)
        for i in range(0, count, chunk):
            store.tasks.create_many(requests[i : i + chunk])
        ours = census(ours_path, lambda: store.tasks.create(SEED_LAB_ORDER), samples)
        store.close()

        anchor_path = Path(tmp) / "anchor.db"
        anchor = open_anchor(anchor_path)
        rows = prepared_rows(requests)
        for i in range(0, count, chunk):
            anchor_bulk(anchor, rows[i : i + chunk])
        singles = iter(prepared_rows([SEED_LAB_ORDER] * samples))

        def anchor_single() -> None:
            row, body = next(singles)
            anchor.execute("BEGIN IMMEDIATE")
            anchor.execute(_ANCHOR_TASK, anchor_row(row, body))
            anchor.execute(_ANCHOR_OUTBOX, (new_change_id(), row[0], body, row[14]))
            anchor.execute("COMMIT")

        theirs = census(anchor_path, anchor_single, samples)
        anchor.close()

    print(f"pages per single create: store of {count:,} tasks, {samples} creates\n")
    width = max(len(n) for n in [*ours, "b-tree"])
    print(f"{'b-tree'.ljust(width)}  pages/create")
    print(f"{'-' * width}  ------------")
    for name, pages in ours.most_common():
        print(f"{name.ljust(width)}  {pages / samples:12.2f}")
    print(f"{'total'.ljust(width)}  {sum(ours.values()) / samples:12.2f}")
    print(f"{'anchor total'.ljust(width)}  {sum(theirs.values()) / samples:12.2f}")


if __name__ == "__main__":
    main()
