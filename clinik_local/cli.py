"""The ``clinik-local`` command line: demo, tasks, check (and sync, serve, export, import).

Exit codes: 0 success; 1 ``check`` found problems; 2 bad usage or bad input
(ValidationError); 3 not found; 4 storage error (locked, corrupt, foreign, newer,
read-only, full); 5 sync error; 130 interrupted. Errors go to stderr as one readable
line (``--json`` prints them as JSON there too), results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .codec import encode_task
from .errors import (
    ClinikError,
    ConflictError,
    NotFoundError,
    StorageError,
    SyncError,
    ValidationError,
)
from .model import ApiResponse, Task
from .storage import outbox as outbox_rows
from .store import TaskStore

__all__ = ["main"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_STORAGE = 4
EXIT_SYNC = 5

_EPILOG = """\
examples:
  clinik-local demo                                  # 100,000 tasks in memory
  clinik-local demo --db clinic.db --tasks 20000
  echo '{"status":"requested","intent":"order"}' | clinik-local tasks create --db clinic.db
  clinik-local tasks get task_01J... --db clinic.db --json
  clinik-local tasks search --db clinic.db status=requested,received ownerId=prac_lab_tech
  clinik-local check --db clinic.db
  clinik-local export --db clinic.db --format R4 --out tasks.ndjson
  clinik-local import --db other.db --format R4 tasks.ndjson
  CLINIK_TOKEN=secret clinik-local serve --port 8080
  CLINIK_TOKEN=secret clinik-local sync run --db clinic.db --url http://127.0.0.1:8080/api/v1
"""


def _json_out(value: object, out: TextIO) -> None:
    out.write(json.dumps(value, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n")


def _task_out(task: Task) -> dict[str, Any]:
    return encode_task(task)


def _parse_filters(pairs: Sequence[str]) -> dict[str, object]:
    filters: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValidationError.single(
                "filter", "expected NAME=VALUE (commas mean any of)", pair, "e.g. status=requested"
            )
        filters[name] = None if value == "" else value
    return filters


def _read_request(data: str | None) -> object:
    text = data if data is not None else sys.stdin.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError.single("request", f"is not valid JSON: {exc}", text) from None


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .demo import run_demo

    return run_demo(
        db=args.db, tasks=args.tasks, seed=args.seed, out=out, sync_changes=args.sync_changes
    )


def _cmd_tasks_create(args: argparse.Namespace, out: TextIO) -> int:
    request = _read_request(args.data)
    with TaskStore.open(args.db) as store:
        if isinstance(request, list):
            many = store.tasks.create_many(request)
            if args.json:
                _json_out({"data": [_task_out(t) for t in many.data], "meta": many.meta}, out)
            else:
                for task in many.data:
                    print(task.id, file=out)
            return EXIT_OK
        if not isinstance(request, dict):
            raise ValidationError.single("request", "expected a JSON object or array", request)
        response = store.tasks.create(request)
    _print_task_response(response, args.json, out)
    return EXIT_OK


def _print_task_response(response: ApiResponse[Task], as_json: bool, out: TextIO) -> None:
    if as_json:
        _json_out({"data": _task_out(response.data), "meta": response.meta}, out)
    else:
        print(json.dumps(_task_out(response.data), ensure_ascii=False, indent=2), file=out)
        print(f"# syncState: {response.meta.get('syncState')}", file=out)


def _cmd_tasks_get(args: argparse.Namespace, out: TextIO) -> int:
    with TaskStore.open(args.db) as store:
        response = store.tasks.get(args.id)
    _print_task_response(response, args.json, out)
    return EXIT_OK


def _cmd_tasks_search(args: argparse.Namespace, out: TextIO) -> int:
    filters = _parse_filters(args.filters)
    with TaskStore.open(args.db) as store:
        page = store.tasks.search(
            filters, limit=args.limit, **({"cursor": args.cursor} if args.cursor else {})
        )
    if args.json:
        _json_out({"data": [_task_out(t) for t in page.data], "meta": page.meta}, out)
        return EXIT_OK
    for task in page.data:
        print(
            f"{task.id}  {task.status.value:<12} {(task.priority or '-')!s:<8} "
            f"{task.authored_on}  {task.code or '-':<20} {task.patient_id or '-'}",
            file=out,
        )
    if page.meta.get("hasMore"):
        print(f"# more: --cursor {page.meta['nextCursor']}", file=out)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    with TaskStore.open(args.db) as store:
        problems = store.integrity_check()
        counts = store.table_counts()
        version = store.schema_version()
        with store.read() as conn:
            outbox = outbox_rows.counts_by_state(conn)
            oldest = outbox_rows.oldest_change_at(conn)
    report = {
        "integrity": problems if problems else "ok",
        "schemaVersion": version,
        "tables": counts,
        "outbox": {"byState": outbox, "oldestChangeAt": oldest},
    }
    if args.json:
        _json_out(report, out)
    else:
        print(f"integrity      {'ok' if not problems else '; '.join(problems)}", file=out)
        print(f"schema version {version}", file=out)
        print("tables         " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), file=out)
        states = ", ".join(f"{k} {v:,}" for k, v in sorted(outbox.items())) or "empty"
        print(f"outbox         {states}; oldest change {oldest or '-'}", file=out)
    return EXIT_OK if not problems else EXIT_PROBLEMS


def _cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from .testing.server import serve_forever

    token = os.environ.get(args.token_env) if args.token_env else None
    if not token and args.token_file is None:
        raise ValidationError.single(
            "token",
            f"set {args.token_env or 'CLINIK_TOKEN'} to the bearer token the server accepts, "
            "or pass --token-file FILE to have a random one written there (0600)",
        )
    serve_forever(args.host, args.port, args.db, token, token_file=args.token_file)
    return EXIT_OK


def _sync_store(args: argparse.Namespace) -> TaskStore:
    from .sync import SyncConfig

    variable = args.token_env

    def token_provider() -> str:
        token = os.environ.get(variable)
        if not token:
            raise SyncError(f"no token: set the environment variable {variable}")
        return token

    config = SyncConfig(base_url=args.url, token_provider=token_provider, timeout=args.timeout)
    return TaskStore.open(args.db, sync=config)


def _status_dict(store: TaskStore) -> dict[str, object]:
    import attrs

    return attrs.asdict(store.sync.status())


def _cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    import attrs

    from .progress import Progress

    with _sync_store(args) as store:
        sync = store.sync
        result: object
        if args.action == "status":
            result = _status_dict(store)
        elif args.action == "run":
            total = sync.status().pending
            with Progress("syncing changes", total) as bar:
                unsubscribe = sync.on_status_change(
                    lambda s: bar.advance(max(total - s.pending - bar.done, 0))
                )
                delivered = sync.flush(timeout=args.wait)
                unsubscribe()
            result = {"flushed": delivered, "status": _status_dict(store)}
        elif args.action == "dead-letters":
            result = [attrs.asdict(d) for d in sync.dead_letters()]
        elif args.action == "conflicts":
            result = [attrs.asdict(c) for c in sync.conflicts()]
        elif args.action == "retry":
            sync.retry(args.change_id)
            result = {"retried": args.change_id}
        else:
            sync.discard(args.change_id)
            result = {"discarded": args.change_id}
    if args.json:
        _json_out(result, out)
    else:
        print(json.dumps(result, ensure_ascii=False, indent=2), file=out)
    if args.action == "run" and isinstance(result, dict) and not result["flushed"]:
        return EXIT_SYNC
    return EXIT_OK


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    from .fhir import export_ndjson
    from .progress import Progress

    with TaskStore.open(args.db) as store:
        total = store.tasks.count().data
        target = open(args.out, "w", encoding="utf-8") if args.out != "-" else out  # noqa: SIM115
        try:
            with Progress(f"exporting {args.format}", total) as bar:
                written = export_ndjson(store, target, args.format, progress=bar.advance)
        finally:
            if target is not out:
                target.close()
    print(f"exported {written:,} tasks ({args.format})", file=sys.stderr)
    return EXIT_OK


def _cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    from .fhir import import_ndjson
    from .progress import Progress

    with open(args.file, encoding="utf-8") as counting:
        total = sum(1 for line in counting if line.strip())
    with (
        TaskStore.open(args.db) as store,
        open(args.file, encoding="utf-8") as source,
        Progress(f"importing {args.format}", total) as bar,
    ):
        created = import_ndjson(store, source, args.format, progress=bar.advance)
    if args.json:
        _json_out({"imported": created}, out)
    else:
        print(f"imported {created:,} tasks ({args.format})", file=out)
    return EXIT_OK


def _add_db(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--db", required=required, help="the store file")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinik-local",
        description="Local clinik Tasks store: demo, inspection, sync and FHIR tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="create the seed's lab order and N realistic tasks, then search them",
        description="Create the seed's lab order and N realistic tasks, run each search "
        "and a deep page, and print what each step took.",
    )
    demo.add_argument("--db", default=":memory:", help="store file (default: in memory)")
    demo.add_argument(
        "--tasks", type=int, default=100_000, help="tasks to generate (default 100000)"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed for generated tasks")
    demo.add_argument(
        "--sync-changes",
        type=int,
        default=2_000,
        help="changes made offline, then synced to a local reference server (0: skip)",
    )
    demo.set_defaults(run=_cmd_demo)

    tasks = sub.add_parser("tasks", help="create, get and search tasks (JSON in and out)")
    tasks_sub = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = tasks_sub.add_parser(
        "create",
        help="create a task (or a JSON array of tasks) from --data or stdin",
        epilog='example: echo \'{"status":"requested","intent":"order"}\' | '
        "clinik-local tasks create --db clinic.db",
    )
    _add_db(create)
    create.add_argument("--data", help="the wire-form request JSON (default: read stdin)")
    create.set_defaults(run=_cmd_tasks_create)
    get = tasks_sub.add_parser("get", help="print one task")
    get.add_argument("id")
    _add_db(get)
    get.set_defaults(run=_cmd_tasks_get)
    search = tasks_sub.add_parser(
        "search",
        help="search with the API's filter names: NAME=VALUE (commas mean any of)",
        epilog="example: clinik-local tasks search --db clinic.db status=requested,received",
    )
    search.add_argument("filters", nargs="*", metavar="NAME=VALUE")
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--cursor", help="nextCursor of the previous page")
    _add_db(search)
    search.set_defaults(run=_cmd_tasks_search)

    check = sub.add_parser(
        "check", help="integrity check, schema version, table sizes and outbox health"
    )
    _add_db(check)
    check.set_defaults(run=_cmd_check)

    serve = sub.add_parser(
        "serve",
        help="run the reference clinik server (the sync contract) on 127.0.0.1",
        epilog="example: CLINIK_TOKEN=secret clinik-local serve --port 8080 --db server.db",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="a loopback address to listen on (others are refused)"
    )
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--db", default=":memory:", help="the server's own SQLite file")
    serve.add_argument(
        "--token-env",
        default="CLINIK_TOKEN",
        help="environment variable holding the accepted bearer token (default CLINIK_TOKEN); "
        "the token is never printed",
    )
    serve.add_argument(
        "--token-file",
        default=None,
        help="with the variable unset: write a random token to this file (created 0600)",
    )
    serve.set_defaults(run=_cmd_serve)

    sync = sub.add_parser(
        "sync",
        help="sync status, delivery, dead letters and conflicts of a store",
        epilog="examples:\n  CLINIK_TOKEN=... clinik-local sync run --db clinic.db "
        "--url https://clinic-host/api/v1\n  clinik-local sync dead-letters --db clinic.db "
        "--url https://clinic-host/api/v1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sync_sub = sync.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("status", "where sync stands: state and outbox counts"),
        ("run", "deliver every pending change now (progress bar), then print the status"),
        ("dead-letters", "changes the server refused for good"),
        ("conflicts", "tasks whose server version moved on (412), both versions"),
        ("retry", "put a dead letter back in the queue"),
        ("discard", "drop a dead letter (the local task stays as it is)"),
    ):
        p = sync_sub.add_parser(action, help=text)
        _add_db(p)
        p.add_argument("--url", required=True, help="the service's API root")
        p.add_argument(
            "--token-env",
            default="CLINIK_TOKEN",
            help="environment variable with the bearer token (never a command-line argument)",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
        if action == "run":
            p.add_argument("--wait", type=float, default=300.0, help="give up after N seconds")
        if action in ("retry", "discard"):
            p.add_argument("change_id")
        p.set_defaults(run=_cmd_sync)

    export = sub.add_parser(
        "export",
        help="write every task as NDJSON: wire form, or FHIR R4/R5 Task resources",
        epilog="example: clinik-local export --db clinic.db --format R4 --out tasks.ndjson",
    )
    export.add_argument("--db", required=True, help="the store file")
    export.add_argument("--format", choices=("wire", "R4", "R5"), default="wire")
    export.add_argument("--out", default="-", help="output file (default: stdout)")
    export.set_defaults(run=_cmd_export)

    imp = sub.add_parser(
        "import",
        help="create tasks from NDJSON (wire form or FHIR R4/R5), in batches of 1,000",
        epilog="example: clinik-local import --db clinic.db --format R5 tasks.ndjson",
    )
    _add_db(imp)
    imp.add_argument("--format", choices=("wire", "R4", "R5"), default="wire")
    imp.add_argument("file", help="the NDJSON file")
    imp.set_defaults(run=_cmd_import)
    return parser


_EXIT_FOR: tuple[tuple[type[ClinikError], int], ...] = (
    (ValidationError, EXIT_USAGE),
    (NotFoundError, EXIT_NOT_FOUND),
    (ConflictError, EXIT_USAGE),
    (StorageError, EXIT_STORAGE),
    (SyncError, EXIT_SYNC),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace, TextIO], int] = args.run
    try:
        return run(args, sys.stdout)
    except ClinikError as exc:
        code = next((c for kind, c in _EXIT_FOR if isinstance(exc, kind)), EXIT_USAGE)
        if getattr(args, "json", False):
            error: dict[str, object] = {"error": type(exc).__name__, "message": str(exc)}
            if isinstance(exc, ValidationError):
                error["fields"] = [
                    {"path": e.path, "message": e.message, "allowed": e.allowed} for e in exc.errors
                ]
            print(json.dumps(error), file=sys.stderr)
        else:
            print(f"clinik-local: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
