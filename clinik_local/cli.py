"""The ``clinik-local`` command line: demo, tasks, check, sync, serve, export, import.

Results go to stdout (valid JSON wherever the result is data); progress and errors go
to stderr. Every failure is one readable line on stderr, ``clinik-local: error: ...``
(with ``--json``: one JSON object there instead), and exits with one of the codes of
:data:`EXIT_CODES` (also listed by ``clinik-local --help``).

Commands that only read or change what a store holds refuse a ``--db`` file that does
not exist, so a mistyped path never turns into a new, empty store reporting success.
Only ``tasks create``, ``import``, ``demo`` and ``serve`` create a store file, and a
``tasks create`` or ``import`` that fails removes the file it created.

The CLI uses the library's public API only (``TaskStore``, ``store.tasks``,
``store.sync``, ``SyncConfig``, the NDJSON helpers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import __version__
from .errors import (
    ClinikError,
    ConflictError,
    FieldError,
    NotFoundError,
    StorageError,
    SyncError,
    ValidationError,
)

if TYPE_CHECKING:
    from .remotes.fhir import FhirR4Remote
    from .storage.encryption import KeyProvider
    from .store import TaskStore
    from .sync import SyncConfig, SyncStatus

__all__ = ["EXIT_CODES", "main"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_STORAGE = 4
EXIT_SYNC = 5
EXIT_UNREACHABLE = 6
EXIT_PARKED = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

#: Every exit code of ``clinik-local`` and what it means.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_PROBLEMS, "`check` found problems in the store"),
    (
        EXIT_USAGE,
        "bad usage or bad input: an unknown option or value, invalid JSON, a refused "
        "field (ValidationError), an input file that is not UTF-8, a version or "
        "lifecycle conflict",
    ),
    (
        EXIT_NOT_FOUND,
        "not found: no such task, dead letter or conflict; the --db store file or the "
        "input file does not exist",
    ),
    (
        EXIT_STORAGE,
        "storage or system error: the store is locked, corrupt, foreign, newer, "
        "read-only or full; an output file cannot be written; the port is in use",
    ),
    (
        EXIT_SYNC,
        "sync error: no token in the environment variable, the token was refused, "
        "or `sync run --wait` ran out before every change was delivered, or another sync "
        "engine (named) holds the store",
    ),
    (
        EXIT_UNREACHABLE,
        "`sync run`: the service is unreachable (reported after the first failed "
        "connection; --wait-online keeps retrying until --wait)",
    ),
    (
        EXIT_PARKED,
        "`sync run` delivered what it could, but dead letters or conflicts remain",
    ),
    (EXIT_INTERNAL, "internal error (a bug in clinik-local; CLINIK_TRACEBACK=1 shows it)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_BROKEN_PIPE, "the reader of stdout went away (e.g. `| head`)"),
)

_MEMORY = ":memory:"
_DEMO_DB = "clinik-demo.db"  # demo.DEFAULT_DB (not imported: demo loads the server)
_FORMATS = {"wire": "wire", "r4": "R4", "r5": "R5"}
_MAX_FIELDS_SHOWN = 5  # per error line; --json shows up to _MAX_FIELDS_JSON
_MAX_FIELDS_JSON = 50
_MAX_LINE = 1_000
# Local sync commands (status, dead letters, conflicts, retry, discard, resolve) read and
# write the store's outbox only; the engine needs a config but this process never sends.
_LOCAL_ONLY_URL = "http://127.0.0.1:9/local-only"

_EPILOG = (
    """\
examples:
  clinik-local demo                                  # ./clinik-demo.db, 20,000 tasks
  clinik-local demo --db :memory: --tasks 100000
  echo '{"status":"requested","intent":"order"}' | clinik-local tasks create --db clinic.db
  clinik-local tasks get task_01J... --db clinic.db
  clinik-local tasks update task_01J... --db clinic.db --data '{"status":"accepted"}' --if-match 1
  clinik-local tasks search --db clinic.db status=requested,received ownerId=prac_lab_tech limit=5
  clinik-local check --db clinic.db
  clinik-local export --db clinic.db --format r4 --out tasks.ndjson
  clinik-local import --db other.db --format r4 tasks.ndjson
  CLINIK_TOKEN=secret clinik-local serve --port 8080
  CLINIK_TOKEN=secret clinik-local sync run --db clinic.db --url http://127.0.0.1:8080/api/v1
  clinik-local sync status --db clinic.db
  CLINIK_DB_KEY=... clinik-local encrypt --db clinic.db   # then every --db command needs it

exit codes:
"""
    + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES)
    + "\n"
)


class _Failure(Exception):
    """A failure the CLI itself detects: one line for stderr and its exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the exit code is EXIT_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types -------------------------------------------------------------------


def _format_name(text: str) -> str:
    try:
        return _FORMATS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown format {text!r} (allowed: wire, R4, R5, in any case)"
        ) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range (0-65535; 0 picks a free one)")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0-86400 seconds)")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


# --- output ---------------------------------------------------------------------------


def _json_out(value: object, out: TextIO, pretty: bool = False) -> None:
    if pretty:
        out.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
    else:
        out.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")


def _envelope_out(data: object, meta: object, as_json: bool, out: TextIO) -> None:
    """``{"data": ..., "meta": ...}``: compact with --json, indented for people."""
    _json_out({"data": data, "meta": meta}, out, pretty=not as_json)


def _one_line(text: str) -> str:
    text = " ".join(text.splitlines())
    if len(text) > _MAX_LINE:
        text = text[: _MAX_LINE - 1] + "…"
    return text


def _error_text(exc: BaseException) -> str:
    """The error as one readable line: a long list of field problems is cut short."""
    if isinstance(exc, ValidationError) and len(exc.errors) > _MAX_FIELDS_SHOWN:
        shown = "; ".join(str(e) for e in exc.errors[:_MAX_FIELDS_SHOWN])
        rest = len(exc.errors) - _MAX_FIELDS_SHOWN
        return _one_line(f"{len(exc.errors):,} invalid fields: {shown}; and {rest:,} more")
    return _one_line(str(exc))


def _report(exc: BaseException, code: int, as_json: bool) -> int:
    text = _error_text(exc)
    if as_json:
        name = "CliError" if isinstance(exc, _Failure) else type(exc).__name__
        error: dict[str, object] = {"error": name, "message": text, "exitCode": code}
        if isinstance(exc, ValidationError):
            error["fields"] = [
                {"path": e.path, "message": e.message, "allowed": e.allowed}
                for e in exc.errors[:_MAX_FIELDS_JSON]
            ]
            if len(exc.errors) > _MAX_FIELDS_JSON:
                error["moreFields"] = len(exc.errors) - _MAX_FIELDS_JSON
        print(json.dumps(error, ensure_ascii=False), file=sys.stderr)
    else:
        print(f"clinik-local: error: {text}", file=sys.stderr)
    return code


# --- input ----------------------------------------------------------------------------


def _parse_filters(pairs: Sequence[str]) -> dict[str, object]:
    filters: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValidationError.single(
                "filter", "expected NAME=VALUE (commas mean any of)", pair, "e.g. status=requested"
            )
        if name in filters:
            raise ValidationError.single(
                name, "is given twice; give one NAME=VALUE (commas mean any of)", pair
            )
        filters[name] = None if value == "" else value
    return filters


def _read_json(data: str | None, what: str) -> object:
    """``data`` as JSON, or stdin when it is None (``-`` also means stdin)."""
    if data is None or data == "-":
        if sys.stdin.isatty():
            print(f"reading the {what} JSON from stdin (end with Ctrl-D)", file=sys.stderr)
        data = sys.stdin.read()
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValidationError.single(what, f"is not valid JSON: {exc}", data) from None


def _count_ndjson_lines(path: str) -> int:
    """How many non-blank lines the file has; refuses a missing or non-UTF-8 file."""
    total = 0
    try:
        with open(path, "rb") as source:
            for line_no, raw in enumerate(source, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValidationError.single(
                        f"{path} line {line_no}",
                        f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1})",
                        allowed="UTF-8 NDJSON: one JSON object per line",
                    ) from None
                if text.strip():
                    total += 1
    except FileNotFoundError:
        raise _Failure(EXIT_NOT_FOUND, f"cannot read {path}: the file does not exist") from None
    except IsADirectoryError:
        raise _Failure(EXIT_USAGE, f"cannot read {path}: it is a directory, not a file") from None
    except OSError as exc:
        raise _Failure(EXIT_STORAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    return total


# --- stores ---------------------------------------------------------------------------


def _existing(path: str) -> str:
    """``path`` if a store can be there; a missing file is refused, never created."""
    if path != _MEMORY and not os.path.lexists(path):
        raise _Failure(
            EXIT_NOT_FOUND,
            f"no store at {path}: the file does not exist (check --db; only `tasks create` "
            "and `import` start a new store)",
        )
    return path


def _open_existing(path: str, sync: SyncConfig | None = None) -> TaskStore:
    from .store import TaskStore

    return TaskStore.open(_existing(path), sync=sync, key=_key_for(path))


# --- encryption keys: from the environment or a prompt, never from argv -------------------

KEY_ENV = "CLINIK_DB_KEY"
NEW_KEY_ENV = "CLINIK_DB_NEW_KEY"


def _interactive() -> bool:
    """Whether a person can be prompted (stdin is a terminal)."""
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _prompt(prompt: str) -> str:
    import getpass

    return getpass.getpass(prompt)


def _env_key(name: str) -> KeyProvider | None:
    value = os.environ.get(name)
    if not value:
        return None
    return lambda: value


def _asked_key(path: str, *, confirm: bool = False, what: str = "key") -> KeyProvider:
    """A key typed at a prompt (twice with ``confirm``), asked once per command."""
    if not _interactive():
        env = NEW_KEY_ENV if what == "new key" else KEY_ENV
        raise _Failure(
            EXIT_USAGE,
            f"no {what} for {path}: set {env} (keys are never taken from the command line), "
            "or run in a terminal to be prompted",
        )
    key = _prompt(f"{what} for {path}: ")
    if confirm and _prompt(f"{what} for {path} (again): ") != key:
        raise _Failure(EXIT_USAGE, f"the two {what}s typed for {path} differ; nothing changed")
    if not key:
        raise _Failure(EXIT_USAGE, f"an empty {what} was typed for {path}; nothing changed")
    return lambda: key


def _key_for(path: str) -> KeyProvider | None:
    """The key for the store at ``path``, the same way for every command taking --db.

    ``CLINIK_DB_KEY`` if set; else, for a file that is encrypted, a prompt when stdin is
    a terminal (otherwise none: opening then says the key is missing). ``:memory:``
    stores are never encrypted, so they get no key.
    """
    from .storage.encryption import file_kind

    if path == _MEMORY:
        return None
    env = _env_key(KEY_ENV)
    if env is not None:
        return env
    if file_kind(path) == "encrypted" and _interactive():
        return _asked_key(path)
    return None


@contextlib.contextmanager
def _removed_if_failed(path: str) -> Iterator[None]:
    """A store file this command creates is removed again (with -wal/-shm) if it fails."""
    created = path != _MEMORY and not os.path.lexists(path)
    try:
        yield
    except BaseException:
        if created:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path + suffix)
        raise


@contextlib.contextmanager
def _private_output(path: str) -> Iterator[TextIO]:
    """A new file for an export: mode 0600 (patient data, like the store), whole or absent.

    The tasks go to a temporary file beside ``path``, renamed over it only once complete,
    so a failed export never leaves half a file. A device or pipe (``/dev/stdout``) is
    written directly.
    """
    target = Path(path)
    if target.is_dir():
        raise _Failure(EXIT_STORAGE, f"cannot write {path}: it is a directory")
    if target.exists() and not target.is_file():
        with open(path, "w", encoding="utf-8") as stream:
            yield stream
        return
    import tempfile

    try:
        fd, partial = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".partial"
        )
    except FileNotFoundError:
        raise _Failure(
            EXIT_STORAGE, f"cannot write {path}: the directory {target.parent} does not exist"
        ) from None
    except OSError as exc:
        raise _Failure(EXIT_STORAGE, f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            yield stream
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise


# --- demo, tasks, check ---------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .demo import run_demo

    return run_demo(
        db=args.db,
        tasks=args.tasks,
        seed=args.seed,
        out=out,
        sync_changes=args.sync_changes,
        replace=args.db == _DEMO_DB,
        key=_key_for(args.db),
    )


def _cmd_tasks_create(args: argparse.Namespace, out: TextIO) -> int:
    from .codec import encode_task
    from .store import TaskStore

    request = _read_json(args.data, "request")
    if not isinstance(request, (dict, list)):
        raise ValidationError.single("request", "expected a JSON object or array", request)
    with _removed_if_failed(args.db), TaskStore.open(args.db, key=_key_for(args.db)) as store:
        if isinstance(request, list):
            many = store.tasks.create_many(request)
            if args.json:
                _envelope_out([encode_task(t) for t in many.data], many.meta, True, out)
            else:
                for task in many.data:
                    print(task.id, file=out)
            return EXIT_OK
        response = store.tasks.create(request)
    _envelope_out(encode_task(response.data), response.meta, args.json, out)
    return EXIT_OK


def _cmd_tasks_get(args: argparse.Namespace, out: TextIO) -> int:
    from .codec import encode_task

    with _open_existing(args.db) as store:
        response = store.tasks.get(args.id)
    _envelope_out(encode_task(response.data), response.meta, args.json, out)
    return EXIT_OK


def _cmd_tasks_update(args: argparse.Namespace, out: TextIO) -> int:
    from .codec import encode_task

    changes = _read_json(args.data, "changes")
    if not isinstance(changes, dict):
        raise ValidationError.single(
            "changes", "expected a JSON object of the wire fields to change", changes
        )
    with _open_existing(args.db) as store:
        response = store.tasks.update(
            args.id, changes, if_match=args.if_match, admin_override=args.admin_override
        )
    _envelope_out(encode_task(response.data), response.meta, args.json, out)
    return EXIT_OK


def _cmd_tasks_delete(args: argparse.Namespace, out: TextIO) -> int:
    with _open_existing(args.db) as store:
        response = store.tasks.delete(args.id, if_match=args.if_match)
    _envelope_out(response.data, response.meta, args.json, out)
    return EXIT_OK


def _cmd_tasks_history(args: argparse.Namespace, out: TextIO) -> int:
    from .codec import encode_task

    with _open_existing(args.db) as store:
        response = store.tasks.history(args.id)
    if args.json:
        versions = [
            {
                "version": v.version,
                "op": v.op,
                "changedAt": v.changed_at,
                "overrideReason": v.override_reason,
                "task": encode_task(v.task),
            }
            for v in response.data
        ]
        _envelope_out(versions, response.meta, True, out)
        return EXIT_OK
    for v in response.data:
        line = f"v{v.version:<4} {v.op:<7} {v.changed_at}  {v.task.status.value}"
        reason = f"  (override: {v.override_reason})" if v.override_reason else ""
        print(line + reason, file=out)
    return EXIT_OK


def _cmd_tasks_search(args: argparse.Namespace, out: TextIO) -> int:
    from .codec import encode_task

    filters = _parse_filters(args.filters)
    for name, flag in (("limit", args.limit), ("cursor", args.cursor)):
        if flag is None:
            continue
        if name in filters:
            raise ValidationError.single(
                name, f"is given twice: as --{name} and as {name}=...; give one", flag
            )
        filters[name] = flag
    with _open_existing(args.db) as store:
        page = store.tasks.search(filters)
    if args.json:
        _envelope_out([encode_task(t) for t in page.data], page.meta, True, out)
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
    from .storage import outbox as outbox_rows

    with _open_existing(args.db) as store:
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
    import socket

    from .testing.server import serve_forever

    token = os.environ.get(args.token_env) if args.token_env else None
    if not token and args.token_file is None:
        raise ValidationError.single(
            "token",
            f"set {args.token_env or 'CLINIK_TOKEN'} to the bearer token the server accepts, "
            "or pass --token-file FILE to have a random one written there (0600)",
        )
    try:
        serve_forever(args.host, args.port, args.db, token, token_file=args.token_file)
    except ValidationError as exc:
        # The server refuses a port it cannot bind (in use, no permission) by name; for the
        # CLI that is a system problem (exit 4), not bad usage.
        first = exc.errors[0] if exc.errors else None
        if first is not None and first.path == "port" and "cannot listen" in first.message:
            raise _Failure(
                EXIT_STORAGE, f"cannot listen on {args.host}:{args.port}: {first.message}"
            ) from None
        raise
    except socket.gaierror as exc:
        raise _Failure(EXIT_USAGE, f"cannot listen on {args.host!r}: {exc.strerror}") from None
    except OSError as exc:
        if isinstance(exc, ClinikError):
            raise
        raise _Failure(
            EXIT_STORAGE, f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    return EXIT_OK


# --- sync -----------------------------------------------------------------------------


def _flag_error(error: FieldError) -> FieldError:
    """A SyncConfig field problem, named by its command-line flag."""
    flags = {"base_url": "--url", "timeout": "--timeout", "ca_bundle": "--ca-bundle"}
    message = error.message.replace("allow_insecure_http=True", "--allow-insecure-http")
    return FieldError(flags.get(error.path, error.path), message, error.value, error.allowed)


def _check_ca_bundle(path: str) -> None:
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ValidationError.single(
            "--ca-bundle", f"cannot be used: {reason}", path, "a PEM file of CA certificates"
        ) from None


def _remote_config(args: argparse.Namespace) -> SyncConfig:
    """The SyncConfig of ``sync run``, every problem named by its flag or variable."""
    from .sync import SyncConfig

    variable = args.token_env
    if not os.environ.get(variable):
        raise _Failure(
            EXIT_SYNC,
            f"no bearer token: the environment variable {variable} is not set or empty "
            "(set it, or name another variable with --token-env)",
        )
    if args.ca_bundle is not None:
        _check_ca_bundle(args.ca_bundle)

    def token_provider() -> str:
        token = os.environ.get(variable)
        if not token:
            raise SyncError(f"no token: set the environment variable {variable}")
        return token

    try:
        if getattr(args, "reference_map", None) is not None:
            return SyncConfig(remote=_fhir_remote(args, token_provider))
        return SyncConfig(
            remote=args.remote,
            base_url=args.url,
            token_provider=token_provider,
            timeout=args.timeout,
            allow_insecure_http=args.allow_insecure_http,
            ca_bundle=args.ca_bundle,
        )
    except ValidationError as exc:
        raise ValidationError([_flag_error(e) for e in exc.errors]) from None


def _fhir_remote(args: argparse.Namespace, token_provider: Callable[[], str]) -> FhirR4Remote:
    """``sync run --remote fhir-r4 --reference-map FILE``: the FHIR remote with the ids of
    FILE (a JSON object: our id -> the server's id, for every reference field; an id not
    in it follows the default rule of docs/fhir.md)."""
    from .remotes.fhir import FhirR4Remote

    path = args.reference_map
    if args.remote != "fhir-r4":
        raise ValidationError.single(
            "--reference-map", "is for --remote fhir-r4 only", path, "--remote fhir-r4"
        )
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ValidationError.single(
            "--reference-map", f"cannot be read: {reason}", path, "a JSON file"
        ) from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise ValidationError.single(
            "--reference-map",
            "must be a JSON object of strings",
            path,
            '{"our id": "the server\'s id", ...}',
        )
    ids: dict[str, str] = mapping
    return FhirR4Remote(
        args.url,
        token_provider,
        reference_map=lambda _field, our_id: ids.get(our_id),
        timeout=args.timeout,
        allow_insecure_http=args.allow_insecure_http,
        ca_bundle=args.ca_bundle,
    )


def _local_sync_store(args: argparse.Namespace) -> TaskStore:
    """The store with sync controls that only touch its outbox: nothing is sent."""
    from .sync import SyncConfig

    def no_token() -> str:
        raise SyncError("this command works on the local store only")

    config = SyncConfig(base_url=_LOCAL_ONLY_URL, token_provider=no_token)
    return _open_existing(args.db, sync=config)


def _status_dict(status: SyncStatus) -> dict[str, object]:
    import attrs

    return attrs.asdict(status)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _cmd_sync_run(args: argparse.Namespace, out: TextIO) -> int:
    """Deliver the outbox now; stop early, with a distinct code, when offline."""
    from .progress import Progress

    config = _remote_config(args)
    with _open_existing(args.db, sync=config) as store:
        sync = store.sync
        before = sync.status()
        total = before.pending + before.in_flight
        deadline = time.monotonic() + args.wait
        with Progress("syncing changes", total) as bar:
            noted: set[tuple[str, str | None]] = set()

            def on_status(status: SyncStatus) -> None:
                bar.advance(max(total - status.pending - status.in_flight - bar.done, 0))
                news = (status.state, status.last_error)
                # Offline without --wait-online ends the run at once, with its own line.
                quiet = status.state == "offline" and not args.wait_online
                if status.state in ("offline", "backoff") and news not in noted and not quiet:
                    noted.add(news)
                    why = status.last_error or "no answer"
                    bar.note(f"sync: {status.state} ({why}); next try at {status.next_retry_at}")

            unsubscribe = sync.on_status_change(on_status)
            try:
                while True:
                    # Short slices (at least one attempt, even with --wait 0), so that
                    # being offline is noticed right after the first failed connection.
                    slice_seconds = max(min(0.25, deadline - time.monotonic()), 0.05)
                    flushed = sync.flush(timeout=slice_seconds)
                    state = sync.status().state
                    if flushed or state in ("auth_required", "standby"):
                        break
                    if state == "offline" and not args.wait_online:
                        break
                    if time.monotonic() >= deadline:
                        break
            finally:
                unsubscribe()
        status = sync.status()
    parked = bool(status.dead or status.conflicts)
    # "flushed" means everything was delivered: not so while changes are parked.
    report = {"flushed": flushed and not parked, "status": _status_dict(status)}
    _json_out(report, out, pretty=not args.json)
    waiting = _plural(status.pending + status.in_flight, "change")
    if status.state == "standby" and not flushed:
        raise _Failure(
            EXIT_SYNC,
            f"another sync engine holds this store: {status.held_by}; it delivers the "
            f"outbox ({waiting} waiting): let it finish, or stop it and run again",
        )
    if flushed:
        if status.dead or status.conflicts:
            raise _Failure(
                EXIT_PARKED,
                f"{_plural(status.dead, 'dead letter')} and {_plural(status.conflicts, 'conflict')}"
                " remain: see `clinik-local sync dead-letters` and `sync conflicts`, then "
                "`sync retry|discard|resolve`",
            )
        return EXIT_OK
    if status.state == "auth_required":
        raise _Failure(
            EXIT_SYNC,
            f"the service refused the token from {args.token_env} ({status.last_error}); "
            f"{waiting} stay queued",
        )
    if status.state == "offline":
        advice = (
            f"still unreachable after --wait {args.wait:g} s"
            if args.wait_online
            else "run again later, or pass --wait-online to keep retrying up to --wait"
        )
        raise _Failure(
            EXIT_UNREACHABLE,
            f"the service at {args.url} is unreachable ({status.last_error}); {waiting} stay "
            f"queued: {advice}",
        )
    raise _Failure(
        EXIT_SYNC,
        f"gave up after --wait {args.wait:g} s: {waiting} not delivered yet (state "
        f"{status.state}; last error {status.last_error})",
    )


def _cmd_sync_local(args: argparse.Namespace, out: TextIO) -> int:
    import attrs

    with _local_sync_store(args) as store:
        sync = store.sync
        result: object
        if args.action == "status":
            status = sync.status()
            result = {
                "pending": status.pending,
                "in_flight": status.in_flight,
                "dead": status.dead,
                "conflicts": status.conflicts,
            }
        elif args.action == "dead-letters":
            result = [attrs.asdict(d) for d in sync.dead_letters()]
        elif args.action == "conflicts":
            result = [attrs.asdict(c) for c in sync.conflicts()]
        elif args.action in ("retry", "discard") and args.all == (args.change_id is not None):
            raise ValidationError.single(
                "change_id", "give one change id, or --all (optionally with --status)"
            )
        elif args.action == "retry" and args.all:
            result = {"retried": sync.retry_all(args.status), "sent": "on the next `sync run`"}
        elif args.action == "retry":
            fresh = sync.retry(args.change_id)
            result = {
                "retried": args.change_id,
                "changeId": fresh,
                "sent": "on the next `sync run`",
            }
        elif args.action == "discard" and args.all:
            result = {"discarded": sync.discard_all(args.status)}
        elif args.action == "discard":
            sync.discard(args.change_id)
            result = {"discarded": args.change_id}
        else:
            keep: Any = args.keep
            if args.merged is not None:
                keep = _read_json(args.merged, "merged task")
                if not isinstance(keep, dict):
                    raise ValidationError.single(
                        "--merged", "expected a JSON object (the merged task)", keep
                    )
            sync.resolve(args.task_id, keep)
            kept = args.keep or "merged"
            result = {"resolved": args.task_id, "kept": kept}
            if kept != "remote":
                result["sent"] = "on the next `sync run`"
    _json_out(result, out, pretty=not args.json)
    return EXIT_OK


# --- export, import -------------------------------------------------------------------


def _encryption_done(args: argparse.Namespace, out: TextIO, store: TaskStore, verb: str) -> int:
    tasks = store.tasks.count().data
    if args.json:
        _json_out({"db": args.db, "encrypted": store.encrypted, "tasks": tasks}, out)
    else:
        out.write(f"{verb} {args.db} in place ({tasks:,} tasks)\n")
    return EXIT_OK


def _cmd_encrypt(args: argparse.Namespace, out: TextIO) -> int:
    from .storage.encryption import file_kind
    from .store import TaskStore

    path = _existing(args.db)
    if file_kind(path) == "encrypted":
        raise _Failure(
            EXIT_USAGE, f"{path} is already encrypted (change its key with `clinik-local rekey`)"
        )
    key = _env_key(KEY_ENV) or _asked_key(path, confirm=True)
    with TaskStore.open(path) as store:
        store.rekey(key)
        return _encryption_done(args, out, store, "encrypted")


def _cmd_decrypt(args: argparse.Namespace, out: TextIO) -> int:
    from .store import TaskStore

    path = _existing(args.db)
    key = _env_key(KEY_ENV) or _asked_key(path)
    with TaskStore.open(path, key=key) as store:
        store.rekey(None)
        return _encryption_done(args, out, store, "decrypted")


def _cmd_rekey(args: argparse.Namespace, out: TextIO) -> int:
    from .store import TaskStore

    path = _existing(args.db)
    key = _env_key(KEY_ENV) or _asked_key(path)
    with TaskStore.open(path, key=key) as store:
        new_key = _env_key(NEW_KEY_ENV) or _asked_key(path, confirm=True, what="new key")
        store.rekey(new_key)
        return _encryption_done(args, out, store, "re-keyed")


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    from .fhir import export_ndjson
    from .progress import Progress

    with _open_existing(args.db) as store:
        total = store.tasks.count().data
        with contextlib.ExitStack() as stack:
            target = out if args.out == "-" else stack.enter_context(_private_output(args.out))
            with Progress(f"exporting {args.format}", total) as bar:
                written = export_ndjson(store, target, args.format, progress=bar.advance)
    print(f"exported {_plural(written, 'task')} ({args.format})", file=sys.stderr)
    return EXIT_OK


def _format_hint(exc: ValidationError, fmt: str) -> ValidationError:
    """Name the likely cause when a whole file is of another format than --format."""
    mentions_resource_type = any(e.path.endswith("resourceType") for e in exc.errors)
    if not mentions_resource_type:
        return exc
    if fmt == "wire":  # an unknown field resourceType: FHIR resources read as wire form
        hint = "the file looks like FHIR Task resources: try --format R4 or --format R5"
    else:  # resourceType missing or not Task: not FHIR Task resources
        hint = "the file does not hold FHIR Task resources: try --format wire"
    return ValidationError([FieldError("--format", hint, repr(fmt)), *exc.errors])


def _cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    from .fhir import import_ndjson
    from .progress import Progress
    from .store import TaskStore

    total = _count_ndjson_lines(args.file)  # before the store: a bad file creates nothing
    with (
        _removed_if_failed(args.db),
        TaskStore.open(args.db, key=_key_for(args.db)) as store,
        open(args.file, encoding="utf-8") as source,
        Progress(f"importing {args.format}", total) as bar,
    ):
        try:
            created = import_ndjson(
                store, source, args.format, progress=bar.advance, synced=args.synced
            )
        except ValidationError as exc:
            raise _format_hint(exc, args.format) from None
    if args.json:
        _json_out({"imported": created}, out)
    else:
        print(f"imported {_plural(created, 'task')} ({args.format})", file=out)
    return EXIT_OK


# --- the parser -----------------------------------------------------------------------


def _add_encryption(sub: Any) -> None:
    keys = (
        f"The key comes from ${KEY_ENV} (rekey: the new one from ${NEW_KEY_ENV}), or is "
        "asked for at a terminal; never from the command line. Exclusive: refused while "
        "another process has the store open. Crash-safe: killed at any point, the store "
        "opens with the old key or the new one."
    )
    for name, text, run in (
        ("encrypt", "encrypt a plaintext store in place", _cmd_encrypt),
        ("decrypt", "remove a store's encryption in place", _cmd_decrypt),
        ("rekey", "change an encrypted store's key in place", _cmd_rekey),
    ):
        parser = sub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. {keys}",
            epilog=f"example: {KEY_ENV}=... clinik-local {name} --db clinic.db",
        )
        _add_db(parser)
        parser.set_defaults(run=run)


def _add_db(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--db", required=required, help=f"the store file (encrypted: key from ${KEY_ENV})"
    )
    parser.add_argument("--json", action="store_true", help="compact, machine-readable JSON")


def _add_tasks(sub: Any) -> None:
    tasks = sub.add_parser("tasks", help="create, get, update, delete, search tasks (JSON)")
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

    get = tasks_sub.add_parser("get", help="print one task with its sync state (JSON)")
    get.add_argument("id")
    _add_db(get)
    get.set_defaults(run=_cmd_tasks_get)

    update = tasks_sub.add_parser(
        "update",
        help="change fields of a task: given keys replace, null clears",
        epilog="example: clinik-local tasks update task_01J... --db clinic.db "
        '--data \'{"status":"accepted"}\' --if-match 1',
    )
    update.add_argument("id")
    _add_db(update)
    update.add_argument("--data", help="the changes as wire-form JSON (default: read stdin)")
    update.add_argument("--if-match", help="only if the task is still at this versionId")
    update.add_argument(
        "--admin-override", metavar="REASON", help="let a status change the lifecycle forbids"
    )
    update.set_defaults(run=_cmd_tasks_update)

    delete = tasks_sub.add_parser("delete", help="delete a task (queued for sync)")
    delete.add_argument("id")
    _add_db(delete)
    delete.add_argument("--if-match", help="only if the task is still at this versionId")
    delete.set_defaults(run=_cmd_tasks_delete)

    history = tasks_sub.add_parser("history", help="every version of a task, oldest first")
    history.add_argument("id")
    _add_db(history)
    history.set_defaults(run=_cmd_tasks_history)

    search = tasks_sub.add_parser(
        "search",
        help="search with the API's filter names: NAME=VALUE (commas mean any of)",
        epilog="example: clinik-local tasks search --db clinic.db status=requested,received "
        "limit=5 (limit, cursor, sort and total may be given as NAME=VALUE too)",
    )
    search.add_argument("filters", nargs="*", metavar="NAME=VALUE")
    search.add_argument("--limit", type=int, help="tasks per page, 1-1000 (default 20)")
    search.add_argument("--cursor", help="nextCursor of the previous page")
    _add_db(search)
    search.set_defaults(run=_cmd_tasks_search)


#: ``sync --remote``: the names SyncConfig(remote=...) builds (clinik_local.sync.config).
_REMOTES = ("clinik", "fhir-r4")


def _add_sync(sub: Any) -> None:
    sync = sub.add_parser(
        "sync",
        help="sync status, delivery, dead letters and conflicts of a store",
        epilog="examples:\n  CLINIK_TOKEN=... clinik-local sync run --db clinic.db "
        "--url https://clinic-host/api/v1\n  CLINIK_TOKEN=... clinik-local sync run --db clinic.db "
        "--remote fhir-r4 --url https://fhir-host/fhir/R4\n"
        "  clinik-local sync dead-letters --db clinic.db\n"
        "  clinik-local sync resolve task_01J... --keep remote --db clinic.db\n\n"
        "Only `run` talks to the service; the others read or change the local store.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sync_sub = sync.add_subparsers(dest="action", required=True, metavar="ACTION")

    run = sync_sub.add_parser(
        "run",
        help="deliver every pending change now (progress on stderr), then print the status",
        description="Deliver every pending change to the service. Stops with exit code 6 "
        "as soon as the service is unreachable (unless --wait-online), and with exit code "
        "7 when dead letters or conflicts remain.",
    )
    _add_db(run)
    run.add_argument(
        "--url", required=True, help="the service's API root (with fhir-r4: the FHIR base)"
    )
    run.add_argument(
        "--remote",
        choices=_REMOTES,
        default="clinik",
        help="what the service is: the clinik sync contract (default) or a FHIR R4 server",
    )
    run.add_argument(
        "--token-env",
        default="CLINIK_TOKEN",
        help="environment variable with the bearer token (never a command-line argument)",
    )
    run.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    run.add_argument("--wait", type=_seconds, default=300.0, help="give up after N seconds")
    run.add_argument(
        "--wait-online",
        action="store_true",
        help="when the service is unreachable, keep retrying until --wait (default: stop)",
    )
    run.add_argument("--ca-bundle", metavar="PATH", help="trust this CA file (PEM) for TLS")
    run.add_argument(
        "--reference-map",
        metavar="PATH",
        help="with fhir-r4: a JSON object of our ids -> the server's ids for references "
        '(patients, practitioners, ...: {"pt_abc123": "9001"}); docs/fhir.md',
    )
    run.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow plain http to a host that is not loopback (the token travels unencrypted)",
    )
    run.set_defaults(run=_cmd_sync_run)

    for action, text in (
        ("status", "outbox counts: pending, in flight, dead letters, conflicts"),
        ("dead-letters", "changes the server refused for good"),
        ("conflicts", "tasks whose server version moved on (412), both versions"),
        ("retry", "put a dead letter back in the queue (sent on the next `sync run`)"),
        ("discard", "drop a dead letter (the local task stays as it is)"),
        ("resolve", "settle a conflict: keep the local or the remote task, or a merged one"),
    ):
        p = sync_sub.add_parser(action, help=text)
        _add_db(p)
        # Accepted for scripts written when every sync command needed them; unused here.
        p.add_argument("--url", help=argparse.SUPPRESS)
        p.add_argument("--token-env", help=argparse.SUPPRESS)
        p.add_argument("--timeout", help=argparse.SUPPRESS)
        p.add_argument("--remote", choices=_REMOTES, help=argparse.SUPPRESS)
        if action in ("retry", "discard"):
            p.add_argument("change_id", nargs="?", help="the dead letter's change id")
            p.add_argument("--all", action="store_true", help=f"{action} every dead letter")
            p.add_argument(
                "--status", type=int, help="with --all: only those the server answered so (409)"
            )
        if action == "resolve":
            p.add_argument("task_id")
            how = p.add_mutually_exclusive_group(required=True)
            how.add_argument("--keep", choices=("local", "remote"), help="which side wins")
            how.add_argument(
                "--merged", metavar="JSON", help="the merged task as wire JSON ('-': stdin)"
            )
        p.set_defaults(run=_cmd_sync_local)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clinik-local",
        description="Local clinik Tasks store: demo, inspection, sync and FHIR tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"clinik-local {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="create the seed's lab order and N realistic tasks, search them, sync",
        description="Create the seed's lab order and N realistic tasks in a SQLite file, run "
        "each search and a deep page, then show offline changes syncing to a local reference "
        "server; print what each step took.",
    )
    demo.add_argument(
        "--db",
        default=_DEMO_DB,
        help=f"store file (default: ./{_DEMO_DB}, replaced on each run; :memory: allowed)",
    )
    demo.add_argument("--tasks", type=_count, default=20_000, help="tasks to generate (20000)")
    demo.add_argument("--seed", type=int, default=7, help="random seed for generated tasks")
    demo.add_argument(
        "--sync-changes",
        type=_count,
        default=1_000,
        help="changes made offline, then synced to a local reference server (0: skip)",
    )
    demo.set_defaults(run=_cmd_demo)

    _add_tasks(sub)

    check = sub.add_parser(
        "check", help="integrity check, schema version, table sizes and outbox health"
    )
    _add_db(check)
    check.set_defaults(run=_cmd_check)

    _add_encryption(sub)

    serve = sub.add_parser(
        "serve",
        help="run the reference clinik server (the sync contract) on 127.0.0.1",
        epilog="example: CLINIK_TOKEN=secret clinik-local serve --port 8080 --db server.db",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="a loopback address to listen on (others are refused)"
    )
    serve.add_argument("--port", type=_port, default=8080, help="0-65535 (0: a free port)")
    serve.add_argument("--db", default=_MEMORY, help="the server's own SQLite file")
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

    _add_sync(sub)

    export = sub.add_parser(
        "export",
        help="write every task as NDJSON: wire form, or FHIR R4/R5 Task resources",
        epilog="example: clinik-local export --db clinic.db --format R4 --out tasks.ndjson",
    )
    export.add_argument("--db", required=True, help="the store file")
    export.add_argument(
        "--format", type=_format_name, default="wire", metavar="{wire,R4,R5}", help="any case"
    )
    export.add_argument("--out", default="-", help="output file, created 0600 (default: stdout)")
    export.set_defaults(run=_cmd_export)

    imp = sub.add_parser(
        "import",
        help="create tasks from NDJSON (wire form or FHIR R4/R5), in batches of 1,000",
        epilog="example: clinik-local import --db clinic.db --format R5 tasks.ndjson",
    )
    _add_db(imp)
    imp.add_argument(
        "--format", type=_format_name, default="wire", metavar="{wire,R4,R5}", help="any case"
    )
    imp.add_argument(
        "--synced",
        action="store_true",
        help="restore an export of a synced store: the server already has these tasks, "
        "so nothing is sent again (see docs/offline-sync.md, Restoring a device)",
    )
    imp.add_argument("file", help="the NDJSON file (UTF-8)")
    imp.set_defaults(run=_cmd_import)
    return parser


_EXIT_FOR: tuple[tuple[type[ClinikError], int], ...] = (
    (ValidationError, EXIT_USAGE),
    (NotFoundError, EXIT_NOT_FOUND),
    (ConflictError, EXIT_USAGE),
    (StorageError, EXIT_STORAGE),
    (SyncError, EXIT_SYNC),
)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit flush cannot fail."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (see :data:`EXIT_CODES`)."""
    args = _build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace, TextIO], int] = args.run
    as_json = bool(getattr(args, "json", False))
    try:
        return run(args, sys.stdout)
    except ClinikError as exc:
        code = next((c for kind, c in _EXIT_FOR if isinstance(exc, kind)), EXIT_USAGE)
        return _report(exc, code, as_json)
    except _Failure as exc:
        return _report(exc, exc.code, as_json)
    except KeyboardInterrupt:
        print("clinik-local: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _report(OSError(f"{where}{exc.strerror or exc}"), EXIT_STORAGE, as_json)
    except Exception as exc:
        if os.environ.get("CLINIK_TRACEBACK"):
            raise
        message = f"internal error (please report it): {type(exc).__name__}: {exc}"
        return _report(RuntimeError(message), EXIT_INTERNAL, as_json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
