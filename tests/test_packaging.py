"""schema.sql is found from a built wheel, from an editable install and from a source checkout.

Each install goes into its own directory under tmp_path (``pip install --target``) and is
probed by a child interpreter that puts that directory first on ``sys.path``; the
dependencies (attrs, cattrs, apsw) come from the running environment, so nothing but the
build backend is fetched. (A ``venv --system-site-packages`` would see the base
interpreter's packages rather than this environment's, so it could not import the deps.)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = (ROOT / "schema.sql").read_text(encoding="utf-8")

#: Runs in the child: put argv[1] (a site dir: its .pth files count) first on sys.path,
#: then report where clinik_local came from and what schema_sql() read.
_PROBE = """
import hashlib, site, sys
if len(sys.argv) > 1:
    before = list(sys.path)
    site.addsitedir(sys.argv[1])
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before
import clinik_local, clinik_local.storage.migrations as m
from clinik_local import TaskStore
with TaskStore.open(":memory:") as s:
    s.tasks.create({"status": "draft", "intent": "order"})
print(clinik_local.__file__)
print(hashlib.sha256(m.schema_sql().encode()).hexdigest())
"""


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _pip(*args: str) -> None:
    # Without the backend (and `editables`) at hand, pip fetches them into an isolated env.
    have_backend = all(importlib.util.find_spec(m) for m in ("hatchling", "editables"))
    isolation = ["--no-build-isolation"] if have_backend else []
    subprocess.run(
        [sys.executable, "-m", "pip", *args, "-q", "--no-deps", *isolation],
        check=True,
        capture_output=True,
        timeout=300,
    )


def _probe(cwd: Path, site_dir: Path | None = None, **env: str) -> tuple[Path, str]:
    argv = [sys.executable, "-c", _PROBE] + ([str(site_dir)] if site_dir else [])
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=True,
        env={**os.environ, **env},
    )
    location, digest = result.stdout.split()
    return Path(location).resolve(), digest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _pip("wheel", "-w", str(out), str(ROOT))
    (built,) = out.glob("clinik_local-*.whl")
    return built


def test_wheel_carries_schema_sql_and_py_typed_inside_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "clinik_local/schema.sql" in names
        assert "clinik_local/py.typed" in names
        assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
        assert zf.read("clinik_local/schema.sql").decode() == SCHEMA


def test_installed_wheel_finds_schema_sql_through_importlib_resources(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    _pip("install", "--target", str(target), str(wheel))
    location, digest = _probe(tmp_path, target)
    assert location == (target / "clinik_local" / "__init__.py").resolve()  # not the checkout
    assert (target / "clinik_local" / "schema.sql").is_file()
    assert not (target / "schema.sql").exists()
    assert digest == _sha(SCHEMA)


def test_editable_install_finds_the_top_level_schema_sql(tmp_path: Path) -> None:
    target = tmp_path / "editable"
    _pip("install", "--target", str(target), "-e", str(ROOT))
    location, digest = _probe(tmp_path, target)
    assert location == ROOT / "clinik_local" / "__init__.py"  # the checkout, live
    assert digest == _sha(SCHEMA)


def test_a_plain_source_checkout_on_the_path_finds_the_top_level_schema_sql(
    tmp_path: Path,
) -> None:
    location, digest = _probe(tmp_path, None, PYTHONPATH=str(ROOT))
    assert location == ROOT / "clinik_local" / "__init__.py"
    assert digest == _sha(SCHEMA)
