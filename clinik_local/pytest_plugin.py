"""Old import path of the pytest plugin; it lives in :mod:`clinik_local.testing.pytest_plugin`.

The ``pytest11`` entry point names the new module; pytest loads it by itself once
clinik-local is installed. This module is kept for code that imported the fixtures or
``TaskFactory`` from here, or listed it in ``pytest_plugins``.
"""

from __future__ import annotations

from .testing.pytest_plugin import TaskFactory, remote_server, task_factory, task_store

__all__ = ["TaskFactory", "remote_server", "task_factory", "task_store"]
