"""Schema identity and numbered, forward-only migrations.

A new store runs ``schema.sql`` (shipped in the wheel; read with
:mod:`importlib.resources`) and is stamped with :data:`SCHEMA_VERSION` in
``PRAGMA user_version`` and :data:`APPLICATION_ID` in ``PRAGMA application_id``.
A file at an older version is brought forward by running, in order, each entry of
:data:`MIGRATIONS` above its version, all in one transaction. There are no downgrades:
a file from a newer clinik-local is refused untouched.

A migration must not assume the search indexes exist: a store cut in the middle of a
large first bootstrap holds them dropped until the bootstrap ends (their CREATE texts
are kept in ``meta`` key ``sync.bootstrap.indexes``; storage/rows.py,
``drop_search_indexes``). Use ``DROP INDEX IF EXISTS`` / ``CREATE INDEX IF NOT EXISTS``,
and rewrite the kept texts too when a migration changes an index.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "schema_sql"]

#: ``PRAGMA application_id`` of every clinik-local store: ASCII "Clnk".
APPLICATION_ID = 0x436C6E6B
#: The schema version this release writes and fully understands.
SCHEMA_VERSION = 6

#: Version 2 (issue 16, a lean write path): no triggers (storage/rows.py writes the
#: derived rows beside every task row, from derive.py); task_text without prefix
#: indexes, rebuilt from the bodies exactly as the version-1 triggers derived it and
#: merged into one segment (an FTS5 rowid probe costs one seek per segment: 3x faster
#: dense text), and its vocabulary view task_text_terms (dense text searches);
#: tasks_by_authored also carries period_start, for periodStart ranges walked in the
#: default sort order; task_history.body may be NULL (the current version's body is
#: kept once, in tasks; the table is copied into its new form, every row as it was).
#: Nothing else changes: every task, history row, outbox row and derived row is kept.
#: Each CREATE is spelt exactly as in schema.sql, so a migrated
#: file and a new one have the same schema text (tests/test_migrations.py).
_TO_2 = """
DROP TRIGGER tasks_derive_insert;
DROP TRIGGER tasks_derive_delete;
DROP TRIGGER tasks_derive_update;
DROP INDEX tasks_by_authored;
CREATE INDEX tasks_by_authored    ON tasks (authored_on, id, period_start);
DROP TABLE task_text;
CREATE VIRTUAL TABLE task_text USING fts5 (
    description, note, business_status, code, io_values,
    content = '', contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE task_text_terms USING fts5vocab(task_text, 'row');
INSERT INTO task_text (rowid, description, note, business_status, code, io_values)
SELECT seq, json_extract(body, '$.description'), json_extract(body, '$.note'),
       json_extract(body, '$.businessStatus'), json_extract(body, '$.code'),
       (SELECT group_concat(value, ' ') FROM task_io WHERE task_io.seq = tasks.seq)
FROM tasks ORDER BY seq;
INSERT INTO task_text (task_text) VALUES ('optimize');
ALTER TABLE task_history RENAME TO task_history_v1;
CREATE TABLE task_history (
    task_id         TEXT NOT NULL,
    version         INTEGER NOT NULL,
    op              TEXT NOT NULL CHECK (op IN ('create', 'update', 'delete')),
    body            TEXT,                -- wire JSON of this version; NULL: it is in tasks.body
    changed_at      TEXT NOT NULL,
    override_reason TEXT,
    PRIMARY KEY (task_id, version)
) WITHOUT ROWID;
INSERT INTO task_history SELECT * FROM task_history_v1 ORDER BY task_id, version;
DROP TABLE task_history_v1;
"""

#: Version 3 (issue 12, two-way sync): outbox rows record the fields each change set
#: (``patch``), history rows who made them (``origin``), and ``sync_bases`` keeps the
#: last server copy of each task (the base of merges). The same statements end
#: schema.sql, so a migrated file and a new one are alike. Nothing is rewritten: rows
#: of version 2 get ``patch`` NULL (derived from consecutive bodies when needed) and
#: ``origin`` 'local'; bases appear as tasks are pulled or delivered.
_SYNC_PULL = """
ALTER TABLE outbox ADD COLUMN patch TEXT;
ALTER TABLE task_history ADD COLUMN origin TEXT NOT NULL DEFAULT 'local'
    CHECK (origin IN ('local', 'server', 'merge'));
CREATE TABLE sync_bases (
    task_id     TEXT PRIMARY KEY,
    version_id  TEXT,
    body        TEXT NOT NULL,
    unseen      TEXT,
    listed      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""

#: Version 4 (issue 16): a local create or update stores its outbox payload as NULL,
#: read from the history row of the version it wrote (storage/outbox.py PAYLOAD; the
#: end of schema.sql). Nothing to rewrite: rows of version 3 keep their payloads and
#: read the same; the new version only makes an older release refuse the file, since
#: it would send a NULL payload.
_SHARED_PAYLOAD = "-- no statement: outbox rows of older versions read as they are\n"

#: Version 5 (issues 16 and 17): no CHECK evaluates an IN list of three or more
#: constants (SQLite fills a throwaway b-tree with the constants for every row written:
#: ~3 us per list per row). task_history and outbox are copied into tables whose CHECKs
#: are the same rules spelt as OR chains (SQLite cannot alter a CHECK), every row as it
#: was. The outbox keeps its AUTOINCREMENT high-water mark, so no change sequence number
#: is ever reused. Each statement is spelt exactly as in schema.sql, so a migrated file
#: and a new one have the same schema text. (tasks_open_by_due kept its NOT IN until
#: version 6.)
_OR_CHAINS = """
ALTER TABLE task_history RENAME TO task_history_v4;
CREATE TABLE task_history (
    task_id         TEXT NOT NULL,
    version         INTEGER NOT NULL,
    op              TEXT NOT NULL CHECK (op = 'create' OR op = 'update' OR op = 'delete'),
    body            TEXT,                -- wire JSON of this version; NULL: it is in tasks.body
    changed_at      TEXT NOT NULL,
    override_reason TEXT,
    PRIMARY KEY (task_id, version)
) WITHOUT ROWID;
ALTER TABLE task_history ADD COLUMN origin TEXT NOT NULL DEFAULT 'local'
    CHECK (origin = 'local' OR origin = 'server' OR origin = 'merge');
INSERT INTO task_history (task_id, version, op, body, changed_at, override_reason, origin)
SELECT task_id, version, op, body, changed_at, override_reason, origin
FROM task_history_v4 ORDER BY task_id, version;
DROP TABLE task_history_v4;
ALTER TABLE outbox RENAME TO outbox_v4;
CREATE TABLE outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    change_id       TEXT NOT NULL UNIQUE,
    task_id         TEXT NOT NULL,
    op              TEXT NOT NULL CHECK (op = 'create' OR op = 'update' OR op = 'delete'),
    payload         TEXT,                -- wire JSON for create/update; NULL for delete
    base_version    INTEGER,             -- local version the change was made on; NULL for create
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state = 'pending' OR state = 'in_flight' OR state = 'dead'
                           OR state = 'conflict'),
    last_error      TEXT,
    last_status     INTEGER,             -- HTTP status of the last answer, if any
    last_body       TEXT                 -- server's body of the last answer (dead letters)
);
ALTER TABLE outbox ADD COLUMN patch TEXT;
INSERT INTO outbox (seq, change_id, task_id, op, payload, base_version, created_at, attempts,
                    next_attempt_at, state, last_error, last_status, last_body, patch)
SELECT seq, change_id, task_id, op, payload, base_version, created_at, attempts,
       next_attempt_at, state, last_error, last_status, last_body, patch
FROM outbox_v4 ORDER BY seq;
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox');
UPDATE sqlite_sequence
SET seq = max(seq, ifnull((SELECT seq FROM sqlite_sequence WHERE name = 'outbox_v4'), 0))
WHERE name = 'outbox';
DROP TABLE outbox_v4;
CREATE INDEX outbox_by_task  ON outbox (task_id, seq);
CREATE INDEX outbox_by_state ON outbox (state, seq);
"""

#: Version 6 (issue 17): tasks_open_by_due's WHERE without its NOT IN list (a throwaway
#: b-tree per task row written), as one NOT of an OR chain: the same rows, the same
#: plans (search.py writes the same text). SQLite cannot alter an index: it is dropped
#: and built again, spelt exactly as in schema.sql.
_OPEN_BY_DUE = (
    "DROP INDEX tasks_open_by_due;\n"
    "CREATE INDEX tasks_open_by_due    ON tasks (ifnull(period_end, '~'), id)\n"
    "    WHERE NOT (status = 'cancelled' OR status = 'completed' OR status = 'failed' "
    "OR status = 'rejected');\n"
)

#: SQL that upgrades a store *to* each version from the one before it.
MIGRATIONS: Mapping[int, str] = {
    2: _TO_2,
    3: _SYNC_PULL,
    4: _SHARED_PAYLOAD,
    5: _OR_CHAINS,
    6: _OPEN_BY_DUE,
}


@functools.cache
def schema_sql() -> str:
    """The text of ``schema.sql``: from the installed package, or the source checkout.

    A wheel carries it as ``clinik_local/schema.sql``; an editable install or a plain
    source checkout has it once, at the top of the repository.
    """
    packaged = resources.files("clinik_local").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / "schema.sql"
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise FileNotFoundError(
        "schema.sql is missing from the clinik_local installation; reinstall clinik-local"
    )


def _check_migrations() -> None:
    # Forward-only, gap-free: each version from 2 to SCHEMA_VERSION has exactly one step.
    expected = set(range(2, SCHEMA_VERSION + 1))
    if set(MIGRATIONS) != expected:
        raise AssertionError(f"migrations must cover versions {sorted(expected)}")


_check_migrations()
