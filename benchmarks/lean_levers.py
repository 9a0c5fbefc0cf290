"""Issue 16's levers, each measured with raw apsw on a schema variant, in one run.

    python benchmarks/lean_levers.py                 # 30,000 demo tasks, 300 single commits
    python benchmarks/lean_levers.py --tasks 100000
    python benchmarks/lean_levers.py --quick         # smoke run

Every variant gets its own file and the same prepared rows (validation, ids and JSON
already done), written in chunks of 5,000, one ``BEGIN IMMEDIATE`` per chunk; the
chunks go round-robin over the variants so a noisy neighbour hits all alike. Then
single commits (one task + its rows), also round-robin. Printed per variant: bulk
rows/s and its ratio to the anchor (bench_store.py's hand-written six-index table),
single-commit p50/p99, bytes per task (file + WAL after a TRUNCATE checkpoint).
A variant is the current schema.sql with one change, so each row is one lever's worth.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import (
    ANCHOR_SCHEMA,
    anchor_row,
    bytes_per_task,
)

from clinik_local.codec import decode_task, encode_task
from clinik_local.demo import SEED_LAB_ORDER, generate_requests
from clinik_local.derive import derive_rows
from clinik_local.ids import new_change_id, new_task_id
from clinik_local.storage.migrations import schema_sql
from clinik_local.storage.rows import _COLUMNS
from clinik_local.storage.rows import task_row as _row

_TASK = f"INSERT INTO tasks (seq, {_COLUMNS}) VALUES ({', '.join('?' * 19)})"
_HISTORY = (
    "INSERT INTO task_history (task_id, version, op, body, changed_at, override_reason) "
    "VALUES (?, 1, 'create', ?, ?, NULL)"
)
_OUTBOX = (
    "INSERT INTO outbox (change_id, task_id, op, payload, base_version, created_at) "
    "VALUES (?, ?, 'create', ?, NULL, ?)"
)
_SYNC = (
    "INSERT INTO task_sync (task_id, server_version, server_modified, synced_at) "
    "VALUES (?, '1', ?, ?)"
)
_REFS = "INSERT INTO task_refs (kind, ref, seq) VALUES (?, ?, ?)"
_IO = "INSERT INTO task_io (direction, type, value, seq, pos) VALUES (?, ?, ?, ?, ?)"
_TEXT5 = (
    "INSERT INTO task_text (rowid, description, note, business_status, code, io_values) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_TEXT1 = "INSERT INTO task_text (rowid, text) VALUES (?, ?)"
_FTS = re.compile(r"CREATE VIRTUAL TABLE task_text USING fts5 \(.*?\);", re.S)
_TRIGGERS = re.compile(r"CREATE TRIGGER .*?\nEND;\n", re.S)
_RARE = ("tasks_by_intent", "tasks_by_business_status", "tasks_by_encounter", "tasks_by_focus")


def fts(columns: str, prefix: str | None, detail: str = "full") -> str:
    extra = f", prefix = '{prefix}'" if prefix else ""
    extra += f", detail = {detail}" if detail != "full" else ""
    return (
        f"CREATE VIRTUAL TABLE task_text USING fts5 ({columns}, content = '', "
        f"contentless_delete = 1, tokenize = 'unicode61 remove_diacritics 2'{extra});"
    )


FIVE = "description, note, business_status, code, io_values"


def drop_indexes(sql: str, *names: str) -> str:
    for name in names:
        sql, n = re.subn(rf"CREATE INDEX {name}\b[^;]*;\n", "", sql)
        assert n == 1, name
    return sql


def nullable_history(sql: str) -> str:
    """task_history.body may be NULL: "the body is the current one, in tasks"."""
    old = "    body            TEXT NOT NULL,       -- wire JSON of this version"
    if old not in sql:  # schema version 2 has it nullable already
        assert "NULL: it is in tasks.body" in sql
        return sql
    return sql.replace(old, "    body            TEXT,                -- wire JSON of this version")


@attrs.frozen
class Variant:
    """A schema and how rows are written to it."""

    name: str
    schema: str
    derive: bool = False  # bind task_refs/task_io/task_text from derive.py (no triggers)
    one_column: bool = False  # task_text has one column `text`
    history: str = "full"  # full | shared (outbox payload NULL) | none (body only in tasks)
    outbox: bool = True  # False: a pulled server copy (task_sync row instead)
    page_size: int = 4096
    bulk: bool = False  # empty-store import: indexes and search rows built after the load
    anchor: bool = False


V1_SCHEMA = Path(__file__).resolve().parent.parent / "tests" / "data" / "schema_v1.sql"


def variants() -> list[Variant]:
    """The anchor, schema v1 and v2, each lever as v1 with one change, then v2 combined."""
    base = V1_SCHEMA.read_text(encoding="utf-8")
    v2 = schema_sql()
    v2_bare = _TRIGGERS.sub("", v2)
    return [
        Variant("anchor (six indexes, body, outbox row)", ANCHOR_SCHEMA, anchor=True),
        Variant("v1 schema", base),
        Variant("v1, pulled copy (no outbox; task_sync)", base, outbox=False),
        Variant("v1 - tasks_by_owner", drop_indexes(base, "tasks_by_owner")),
        Variant("v1 - tasks_open_by_due", drop_indexes(base, "tasks_open_by_due")),
        Variant("v1 - tasks_by_due", drop_indexes(base, "tasks_by_due")),
        Variant("v1 - intent/business/encounter/focus", drop_indexes(base, *_RARE)),
        Variant("v1, FTS without prefix indexes", _FTS.sub(fts(FIVE, None), base)),
        Variant("v1, FTS detail=column", _FTS.sub(fts(FIVE, "2 3", "column"), base)),
        Variant("v1, derive in Python (no triggers)", _TRIGGERS.sub("", base), derive=True),
        Variant(
            "v1, derive + FTS one column",
            _FTS.sub(fts("text", "2 3"), _TRIGGERS.sub("", base)),
            derive=True,
            one_column=True,
        ),
        Variant("v1, history shares the outbox body", base, history="shared"),
        Variant("v1, history body only in tasks", nullable_history(base), history="none"),
        Variant("v1, page_size 8192", base, page_size=8192),
        Variant("v1, page_size 16384", base, page_size=16384),
        # Schema version 2 has no triggers: rows.py binds the derived rows (derive.py).
        Variant("v2 + derive (rows.py binds)", v2_bare, derive=True),
        Variant("v2 + derive + history shared", v2_bare, derive=True, history="shared"),
        Variant("v2 + derive, pulled copy", v2_bare, derive=True, outbox=False),
        Variant(
            "v2 + derive + body only in tasks",
            nullable_history(v2_bare),
            derive=True,
            history="none",
        ),
        Variant("v2 + derive, bulk path (indexes after)", v2_bare, derive=True, bulk=True),
    ]


Prepared = tuple[tuple[object, ...], str, dict[str, Any]]


def prepare(requests: list[dict[str, Any]]) -> list[Prepared]:
    out: list[Prepared] = []
    for request in requests:
        task = decode_task(request)
        object.__setattr__(task, "id", new_task_id())
        object.__setattr__(task, "version_id", "1")
        object.__setattr__(task, "last_modified", task.authored_on)
        wire = encode_task(task)
        body = json.dumps(wire, separators=(",", ":"))
        out.append((_row(task, 1, body), body, wire))
    return out


_INDEX_STMT = re.compile(r"CREATE INDEX [^;]*;", re.S)


class Writer:
    """One variant's file and its write statements."""

    def __init__(self, variant: Variant, path: Path) -> None:
        self.v = variant
        self.path = path
        self.conn = apsw.Connection(str(path))
        self.conn.pragma("page_size", variant.page_size)
        self.conn.pragma("journal_mode", "wal")
        self.conn.pragma("synchronous", "NORMAL")
        self.conn.pragma("cache_size", -65536)
        self.seq = 0
        self.deferred: list[str] = []
        schema = variant.schema
        if variant.bulk:
            self.deferred = _INDEX_STMT.findall(schema)
            schema = _INDEX_STMT.sub("", schema)
            self.fts_sql = _FTS.search(schema)[0]  # type: ignore[index]
            schema = _FTS.sub("", schema)
            self.pending: list[tuple[int, dict[str, Any]]] = []
        self.conn.execute(schema)
        self.elapsed = 0.0

    def write(self, rows: list[Prepared]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        if self.v.anchor:
            c.executemany(_TASK_ANCHOR, [anchor_row(r, b) for r, b, _ in rows])
            c.executemany(_ANCHOR_OUTBOX, [(new_change_id(), r[0], b, r[14]) for r, b, _ in rows])
            c.execute("COMMIT")
            return
        first = self.seq + 1
        self.seq += len(rows)
        seqs = range(first, self.seq + 1)
        c.executemany(_TASK, [(s, *r) for s, (r, _, _) in zip(seqs, rows, strict=True)])
        if self.v.derive:
            if self.v.bulk:
                self.pending.extend((s, w) for s, (_, _, w) in zip(seqs, rows, strict=True))
            else:
                self._derived(list(zip(seqs, (w for _, _, w in rows), strict=True)))
        history_body = (lambda b: None) if self.v.history == "none" else (lambda b: b)
        c.executemany(_HISTORY, [(r[0], history_body(b), r[14]) for r, b, _ in rows])
        if self.v.outbox:
            payload = (lambda b: b) if self.v.history == "full" else (lambda b: None)
            c.executemany(_OUTBOX, [(new_change_id(), r[0], payload(b), r[14]) for r, b, _ in rows])
        else:
            c.executemany(_SYNC, [(r[0], r[14], r[14]) for r, _, _ in rows])
        c.execute("COMMIT")

    def _derived(self, items: list[tuple[int, dict[str, Any]]]) -> None:
        refs: list[tuple[object, ...]] = []
        io: list[tuple[object, ...]] = []
        text: list[tuple[object, ...]] = []
        for seq, wire in items:
            d = derive_rows(wire)
            refs.extend((k, r, seq) for k, r in d.refs)
            io.extend((dr, t, v, seq, p) for dr, t, v, p in d.io)
            if self.v.one_column:
                text.append((seq, " ".join(t for t in d.text if t)))
            else:
                text.append((seq, *d.text))
        self.conn.executemany(_REFS, refs)
        self.conn.executemany(_IO, io)
        self.conn.executemany(_TEXT1 if self.v.one_column else _TEXT5, text)

    def finish_bulk(self) -> None:
        """Build what the bulk path deferred: indexes, then the search rows, in order."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        for stmt in self.deferred:
            c.execute(stmt)
        c.execute(self.fts_sql)
        self._derived(self.pending)
        c.execute("COMMIT")
        self.pending = []

    def close(self) -> float:
        self.conn.close()
        return bytes_per_task(self.path)


_TASK_ANCHOR = (
    "INSERT INTO tasks (id, patient_id, owner_id, requester_id, status, priority_rank, code, "
    "authored_on, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ANCHOR_OUTBOX = (
    "INSERT INTO outbox (change_id, task_id, op, payload, created_at) VALUES (?, ?, 'create', ?, ?)"
)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_matches(conn: apsw.Connection, query: str) -> None:
    conn.execute("SELECT count(*) FROM task_text WHERE task_text MATCH ?", (query,)).fetchall()


def prefix_cost(path: Path, prefixes: list[str], reps: int) -> list[float]:
    """p50 ms of counting the matches of each 2-3 letter prefix query."""
    conn = apsw.Connection(str(path))
    out = []
    for p in prefixes:
        q = f'"{p}"*'
        count_matches(conn, q)
        ts = [timed(functools.partial(count_matches, conn, q)) for _ in range(reps)]
        out.append(statistics.median(ts) * 1000)
    conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--only", help="substring: run the anchor and matching variants")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count, samples = (2000, 30) if args.quick else (args.tasks, args.samples)
    chosen = [v for v in variants() if v.anchor or not args.only or args.only in v.name]
    rows = prepare(list(generate_requests(count, seed=11)))
    singles = prepare([SEED_LAB_ORDER] * (samples * len(chosen)))
    with tempfile.TemporaryDirectory() as tmp:
        writers = [Writer(v, Path(tmp) / f"v{i}.db") for i, v in enumerate(chosen)]
        chunk = 5000
        for i in range(0, count, chunk):
            part = rows[i : i + chunk]
            for w in writers:
                w.elapsed += timed(functools.partial(w.write, part))
        for w in writers:
            if w.v.bulk:
                w.elapsed += timed(w.finish_bulk)
        single: dict[str, list[float]] = {w.v.name: [] for w in writers}
        k = 0
        for _ in range(samples):
            for w in writers:
                if w.v.bulk:
                    continue
                one = singles[k : k + 1]
                k += 1
                single[w.v.name].append(timed(functools.partial(w.write, one)) * 1e6)
        prefix_paths = {
            w.v.name: w.path for w in writers if w.v.name.startswith(("v1 schema", "v1, FTS w"))
        }
        sizes = {w.v.name: w.close() for w in writers}
        anchor_rate = count / writers[0].elapsed
        anchor_p50 = statistics.median(single[writers[0].v.name])
        anchor_bytes = sizes[writers[0].v.name]
        print(f"lean levers: {count:,} demo tasks in chunks of {chunk:,}, {samples} single commits")
        print(
            f"{'variant':<42} {'rows/s':>8} {'x anchor':>8} {'1 p50 µs':>9} {'x':>5} "
            f"{'1 p99 µs':>9} {'B/task':>7} {'x':>5}"
        )
        for w in writers:
            name = w.v.name
            rate = count / w.elapsed
            ts = sorted(single[name]) or [float("nan")]
            p50, p99 = statistics.median(ts), ts[min(len(ts) - 1, int(len(ts) * 0.99))]
            print(
                f"{name:<42} {rate:>8,.0f} {rate / anchor_rate:>8.2f} {p50:>9.0f} "
                f"{p50 / anchor_p50:>5.2f} {p99:>9.0f} {sizes[name]:>7,.0f} "
                f"{sizes[name] / anchor_bytes:>5.2f}"
            )
        prefixes = ["or", "cb", "lab", "pa"]
        for name, path in prefix_paths.items():
            costs = prefix_cost(path, prefixes, 5 if args.quick else 20)
            listed = ", ".join(f"{p}* {c:.1f}" for p, c in zip(prefixes, costs, strict=True))
            print(f"prefix query count(*) p50 ms, {name}: {listed}")


if __name__ == "__main__":
    main()
