"""The derived search rows of a store file, checked against derive_rows of its bodies.

Schema version 2 writes task_refs, task_io and task_text beside every task row from
Python (storage/rows.py); :func:`derived_problems` reads a file with raw apsw and
says where those rows differ from ``derive_rows(json.loads(body))`` of the tasks it
holds: a missing or stale row, or one left behind by a deleted task. task_text is
contentless, so its whole content is compared through an ``fts5vocab`` instance
table against a scratch FTS5 table filled from derive_rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import apsw

from clinik_local.derive import derive_rows

_EXPECTED_TEXT = (
    "CREATE VIRTUAL TABLE temp.expected USING fts5 (description, note, business_status, "
    "code, io_values, content = '', tokenize = 'unicode61 remove_diacritics 2')"
)


def fts_instances(conn: apsw.Connection, schema: str, table: str) -> list[tuple[object, ...]]:
    """Every (term, rowid, column, offset) of an FTS5 table: its whole content."""
    conn.execute(
        f"CREATE VIRTUAL TABLE temp.{table}_i USING fts5vocab({schema}, {table}, instance)"
    )
    try:
        return sorted(conn.execute(f"SELECT term, doc, col, offset FROM temp.{table}_i"))
    finally:
        conn.execute(f"DROP TABLE temp.{table}_i")


def derived_problems(path: Path) -> list[str]:
    """What differs between the file's derived rows and derive_rows of its task bodies."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    problems: list[str] = []
    try:
        conn.execute(_EXPECTED_TEXT)
        refs: set[tuple[object, ...]] = set()
        io: set[tuple[object, ...]] = set()
        for seq, body in conn.execute("SELECT seq, body FROM tasks").fetchall():
            derived = derive_rows(json.loads(str(body)))
            refs |= {(kind, ref, seq) for kind, ref in derived.refs}
            io |= {(d, t, v, seq, pos) for d, t, v, pos in derived.io}
            conn.execute(
                "INSERT INTO temp.expected (rowid, description, note, business_status, code, "
                "io_values) VALUES (?, ?, ?, ?, ?, ?)",
                (seq, *derived.text),
            )
        stored_refs = set(conn.execute("SELECT kind, ref, seq FROM task_refs"))
        if stored_refs != refs:
            problems.append(f"task_refs: extra {stored_refs - refs}, missing {refs - stored_refs}")
        stored_io = set(conn.execute("SELECT direction, type, value, seq, pos FROM task_io"))
        if stored_io != io:
            problems.append(f"task_io: extra {stored_io - io}, missing {io - stored_io}")
        text = fts_instances(conn, "main", "task_text")
        expected = fts_instances(conn, "temp", "expected")
        if text != expected:
            extra = sorted(set(text) - set(expected))[:5]
            missing = sorted(set(expected) - set(text))[:5]
            problems.append(f"task_text: extra {extra}, missing {missing}")
    finally:
        conn.close()
    return problems
