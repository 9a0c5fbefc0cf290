"""Old import path of the reference server; it lives in :mod:`clinik_local.testing.server`.

Kept so that ``from clinik_local.server import ReferenceServer`` and
``python -m clinik_local.server --port 8080`` go on working. New code imports
``clinik_local.testing.server`` (or ``from clinik_local import ReferenceServer``).
"""

from __future__ import annotations

import sys

from .testing.server import (
    FAULT_KINDS,
    READ_FAULT_KINDS,
    FaultKind,
    Faults,
    ReferenceServer,
    ServerStoppedError,
    main,
    serve_forever,
)

__all__ = [
    "FAULT_KINDS",
    "READ_FAULT_KINDS",
    "FaultKind",
    "Faults",
    "ReferenceServer",
    "ServerStoppedError",
    "main",
    "serve_forever",
]

if __name__ == "__main__":
    sys.exit(main())
