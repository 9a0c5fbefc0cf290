"""The ``clinik-local`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import ClinikError

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinik-local",
        description="Local clinik Tasks store: demo, inspection and sync tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  clinik-local demo\n  clinik-local demo --db clinic.db --tasks 20000\n",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(db=args.db, tasks=args.tasks, seed=args.seed, out=sys.stdout)
    except ClinikError as exc:
        print(f"clinik-local: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
