-- clinik-local store schema: the one source of truth for storage.
--
-- Shipped inside the wheel as clinik_local/schema.sql and run once, inside one
-- transaction, when a new store file is created. The store records
-- PRAGMA user_version = SCHEMA_VERSION (clinik_local/migrations.py) and
-- PRAGMA application_id = 0x436C6E6B ('Clnk'), so a file of another program or of a
-- newer clinik-local is recognised and refused before anything writes to it.
-- Older files are brought forward by the numbered migrations in migrations.py.
--
-- Conventions: instants are fixed-width UTC text YYYY-MM-DDTHH:MM:SS.sssZ, so text
-- order is time order and range scans on them use indexes. Every search index ends
-- with (authored_on, id): the default sort (newest authoredOn first, then id) is read
-- straight off the index, backwards, so a filtered page never builds a temp b-tree,
-- and keyset cursors seek to (authored_on, id) in O(log n) at any depth.

-- tasks: the current version of every live task. Searchable fields are real columns;
-- body is the whole task in its wire (camelCase JSON) form, returned by get/search.
CREATE TABLE tasks (
    seq           INTEGER PRIMARY KEY,   -- rowid: stable integer key (FTS5 content rowid)
    id            TEXT NOT NULL UNIQUE,  -- the task id shared with the remote service
    version       INTEGER NOT NULL,      -- local version counter: versionId on the wire
    status        TEXT NOT NULL,
    intent        TEXT NOT NULL,
    priority      TEXT,
    priority_rank INTEGER NOT NULL,      -- 0 stat, 1 asap, 2 urgent, 3 routine, 4 none
    code          TEXT,
    patient_id    TEXT,
    owner_id      TEXT,
    requester_id  TEXT,
    encounter_id  TEXT,
    focus_id      TEXT,
    business_status TEXT,
    authored_on   TEXT NOT NULL,
    last_modified TEXT NOT NULL,
    period_start  TEXT,
    period_end    TEXT,
    body          TEXT NOT NULL
);

-- Index strategy (clinik_local/search.py compiles every search to use these):
-- * One index per equality filter, each followed by the default sort key
--   (authored_on, id): `field = ?` seeks, and the page is read in order, backwards,
--   with no temp b-tree. An any-of (a list, None for "unassigned", or an enum's
--   {"not": [...]}, which becomes the complement list) is compiled to one
--   `SELECT ... UNION ALL SELECT ...` arm per value: SQLite merges the ordered arms
--   (MERGE (UNION ALL)), so "mine or unassigned" is still index-ordered.
-- * priority is filtered and sorted on priority_rank (0 stat .. 3 routine, 4 none), so
--   tasks_by_priority serves both `priority=` and the work-list sort
--   `-priority,authoredOn` (forward scan).
-- * tasks_worklist serves the lab technician's work list: ownerId any-of (me, or
--   unassigned) sorted -priority,authoredOn; status exclusions are residual checks.
-- * Date filters: authoredOn on tasks_by_authored (which also serves the default
--   sort), lastModified on tasks_by_modified (also the lastModified sort),
--   periodStart on tasks_by_period_start. periodEnd, dueBefore, overdue and the `due`
--   sort use tasks_by_due, on ifnull(period_end, '~'): '~' sorts after every
--   instant, so a task without a due date sorts last ascending and keyset cursors never
--   compare NULLs. tasks_open_by_due holds only tasks not in a terminal status
--   (search.py writes the same `NOT (status = ... OR ...)` term, so the planner
--   matches it): overdue / dueBefore seek it, and its size is the open work, not the history.
-- * Sorts not listed (e.g. `status` alone, mixed directions, a range filter on
--   another date than authoredOn) may sort the matching rows in a temp b-tree; the
--   filter itself is still index-served (see search.py's docstring).
-- Statistics: store.optimize() (PRAGMA optimize) runs after bulk imports and at close.
-- tasks_by_authored carries period_start after the sort key: a periodStart range that
-- matches many tasks is served by walking the default sort order and testing the range
-- on the index entry itself (search.page_query), with no table read for a non-match.
CREATE INDEX tasks_by_authored    ON tasks (authored_on, id, period_start);
CREATE INDEX tasks_by_modified    ON tasks (last_modified, id);
CREATE INDEX tasks_by_period_start ON tasks (period_start, id);
CREATE INDEX tasks_by_due         ON tasks (ifnull(period_end, '~'), id);
CREATE INDEX tasks_open_by_due    ON tasks (ifnull(period_end, '~'), id)
    WHERE NOT (status = 'cancelled' OR status = 'completed' OR status = 'failed' OR status = 'rejected');
CREATE INDEX tasks_by_patient     ON tasks (patient_id, authored_on, id);
CREATE INDEX tasks_by_owner       ON tasks (owner_id, authored_on, id);
CREATE INDEX tasks_worklist       ON tasks (owner_id, priority_rank, authored_on, id);
CREATE INDEX tasks_by_requester   ON tasks (requester_id, authored_on, id);
CREATE INDEX tasks_by_status      ON tasks (status, authored_on, id);
CREATE INDEX tasks_by_priority    ON tasks (priority_rank, authored_on, id);
CREATE INDEX tasks_by_code        ON tasks (code, authored_on, id);
CREATE INDEX tasks_by_intent      ON tasks (intent, authored_on, id);
CREATE INDEX tasks_by_business_status ON tasks (business_status, authored_on, id);
CREATE INDEX tasks_by_encounter   ON tasks (encounter_id, authored_on, id);
CREATE INDEX tasks_by_focus       ON tasks (focus_id, authored_on, id);

-- Derived search data: written beside every task row, in the same transaction, by the
-- one task-row writer in clinik_local/storage/rows.py, from the wire form it holds
-- (clinik_local/derive.py). Schema version 2 has no triggers: deriving in Python and
-- binding the rows costs 40% less per task than json_each re-parsing the body in SQL
-- (benchmarks/lean_levers.py), and lets a bulk import build the indexes after the load.
--
-- task_refs: membership of basedOn / partOf ("tasks part of T").
CREATE TABLE task_refs (
    kind  TEXT NOT NULL CHECK (kind IN ('basedOn', 'partOf')),
    ref   TEXT NOT NULL,
    seq   INTEGER NOT NULL,               -- tasks.seq
    PRIMARY KEY (kind, ref, seq)
) WITHOUT ROWID;
CREATE INDEX task_refs_by_seq ON task_refs (seq);

-- task_io: one row per input / output, with its value rendered as text (booleans as
-- true/false), for `input=type` and `input=type|value` filters.
CREATE TABLE task_io (
    direction TEXT NOT NULL CHECK (direction IN ('input', 'output')),
    type      TEXT NOT NULL,
    value     TEXT,
    seq       INTEGER NOT NULL,           -- tasks.seq
    pos       INTEGER NOT NULL,           -- index in the input/output list
    PRIMARY KEY (direction, type, value, seq, pos)
) WITHOUT ROWID;
CREATE INDEX task_io_by_seq ON task_io (seq);

-- task_text: full-text index (FTS5, contentless, rowid = tasks.seq) over description,
-- note, businessStatus, code and the input/output values. No prefix indexes (schema
-- version 2): they wrote every token three times, for a 25% slower write path, while a
-- prefix query ("cb*") reads about as much either way (benchmarks/lean_levers.py).
-- A task with no text at all has no row here (storage/rows.py, _insert_rows).
CREATE VIRTUAL TABLE task_text USING fts5 (
    description, note, business_status, code, io_values,
    content = '', contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);
-- task_text_terms: the vocabulary of task_text (fts5vocab: no storage of its own). A
-- common search word is expanded to its exact terms, whose doclists FTS5 can seek by
-- rowid, so a dense text match walks the sort order (search.py, _dense_text).
CREATE VIRTUAL TABLE task_text_terms USING fts5vocab(task_text, 'row');


-- task_history: every version of every task, including the deletion, for audit and
-- conflict resolution. override_reason is set when an update bypassed the lifecycle
-- check (an administrative correction) and says why. The body of a live task's
-- current version is kept once, in tasks.body: its history row holds NULL until the
-- next version (or the deletion) supersedes it and writes the body there
-- (storage/rows.py; readers go through rows.history, which reads
-- coalesce(task_history.body, tasks.body)). Schema version 2; version-1 files keep
-- their full rows, which read the same.
CREATE TABLE task_history (
    task_id         TEXT NOT NULL,
    version         INTEGER NOT NULL,
    op              TEXT NOT NULL CHECK (op = 'create' OR op = 'update' OR op = 'delete'),
    body            TEXT,                -- wire JSON of this version; NULL: it is in tasks.body
    changed_at      TEXT NOT NULL,
    override_reason TEXT,
    PRIMARY KEY (task_id, version)
) WITHOUT ROWID;

-- outbox: one row per local change, written in the same transaction as the change.
-- change_id is the Idempotency-Key sent with every attempt of that change, so a retry
-- after a crash cannot apply it twice. seq (AUTOINCREMENT: never reused) orders the
-- changes of one task. state: pending (to send, at next_attempt_at or at once when
-- NULL), in_flight (being sent), dead (parked: the server will never take it as
-- sent), conflict (the server's task changed meanwhile; see sync_conflicts).
-- For a dead row next_attempt_at holds when it was parked (it is never due again
-- until store.sync.retry()). Delivered rows are removed; task_history keeps the
-- record of the change.
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
CREATE INDEX outbox_by_task  ON outbox (task_id, seq);
CREATE INDEX outbox_by_state ON outbox (state, seq);

-- task_sync: what the remote service last said about each task; outlives local
-- deletion so the DELETE can carry If-Match.
CREATE TABLE task_sync (
    task_id         TEXT PRIMARY KEY,
    server_version  TEXT,                -- versionId from the server: the next If-Match
    server_modified TEXT,
    synced_at       TEXT
) WITHOUT ROWID;

-- sync_conflicts: tasks whose change the server refused with 412 because its version
-- had moved on; both sides are kept until store.sync.resolve() decides.
CREATE TABLE sync_conflicts (
    task_id       TEXT PRIMARY KEY,
    change_id     TEXT NOT NULL,
    local_body    TEXT,                  -- NULL when the local change was a delete
    server_body   TEXT,                  -- NULL when the server no longer has the task
    detected_at   TEXT NOT NULL
) WITHOUT ROWID;

-- meta: small key/value facts about the store (created_at, store_id, sync cursors).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- ====================================================================================
-- Two-way sync (issue 12; schema version 3, storage/migrations.py _SYNC_PULL runs the
-- same statements on an older file, so a new file and a migrated one are alike).
-- ====================================================================================
-- outbox.patch: the wire fields the change set (JSON object {field: value or null}:
-- merge.patch_of(previous local body, new local body)); NULL for a delete, and for rows
-- written before version 3 (derived from consecutive bodies when needed). A pulled
-- server version is merged with these patches (merge.rebase).
ALTER TABLE outbox ADD COLUMN patch TEXT;
-- task_history.origin: who made the version: 'local' (an edit here), 'server' (a
-- server copy: pulled, listed, or a resolution keeping the server's task) or 'merge'
-- (undelivered local changes replayed on a newer server version).
ALTER TABLE task_history ADD COLUMN origin TEXT NOT NULL DEFAULT 'local'
    CHECK (origin = 'local' OR origin = 'server' OR origin = 'merge');
-- sync_bases: the last server copy of each task this device accepted, the base of
-- every merge. body is the server's wire JSON exactly as sent (unknown fields and
-- over-long texts included); version_id its versionId. unseen: a versionId this device
-- learnt outside the change log (a 2xx or 412 answer) that the log has not shown yet;
-- log items of the task before it are older than what is known and are skipped.
-- listed: the bootstrap generation (meta sync.generation) that last saw the task;
-- after a bootstrap, tasks it did not see and with no undelivered change are removed.
-- (storage/replica.py owns this table and the sync.* keys of meta.)
CREATE TABLE sync_bases (
    task_id     TEXT PRIMARY KEY,
    version_id  TEXT,
    body        TEXT NOT NULL,
    unseen      TEXT,
    listed      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- ====================================================================================
-- Schema version 4 (issue 16, a lean write path): a local change's body is kept once.
-- ====================================================================================
-- outbox.payload (its CREATE comment above is the text of version 1) is NULL for a
-- delete, and for a local create or update written by storage/rows.py: its body is
-- the body of the version the change wrote, ifnull(base_version, 0) + 1, which
-- task_history keeps (or tasks.body while it is the current version: see
-- task_history), so a pending create holds no second copy of the task
-- (storage/outbox.py PAYLOAD reads it back). Other rows (a rebase's merged change,
-- rows of older files) carry their own payload. No statement: the version
-- number makes an older clinik-local refuse a file whose NULL payloads it would misread.

-- ====================================================================================
-- Schema version 5 (issues 16 and 17): no IN list of three or more constants in a CHECK.
-- SQLite evaluates `x IN ('a', 'b', 'c')` in a CHECK constraint by filling a throwaway
-- b-tree with the constants for every row written (about 4x the instructions of the
-- same test spelt as an OR chain: ~3 us per constraint per row). The CHECKs of
-- task_history.op and .origin and of outbox.op and .state are spelt as OR chains above
-- (the same rules: every column is NOT NULL); storage/migrations.py rebuilds an older
-- file's two tables into exactly this text. The WHERE of tasks_open_by_due keeps its
-- NOT IN on purpose: spelt as an AND chain (with search.py's term), the planner took
-- the partial index and a temp b-tree for an overdue search in the default sort
-- instead of walking tasks_by_authored, 0.8-2 ms -> 67-69 ms at 200,000 tasks
-- (benchmarks/bench_search.py).

-- ====================================================================================
-- Schema version 6 (issue 17): no IN list of three or more constants anywhere a row
-- write evaluates it. tasks_open_by_due's WHERE was `status NOT IN ('cancelled',
-- 'completed', 'failed', 'rejected')`, so every task row written built and filled a
-- throwaway b-tree (24k of the 641k instructions of a fixture test's open, create,
-- search and close). It is now one NOT of an OR chain: the same rule, still one term for
-- the planner (as NOT IN was; an AND chain is four, which is what changed the overdue
-- plan above), and search.py writes the same text. storage/migrations.py drops and
-- builds the index again in an older file.
