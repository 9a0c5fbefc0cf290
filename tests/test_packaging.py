"""schema.sql is found both from a built wheel and from the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_PROBE = (
    "import clinik_local, clinik_local.migrations as m;"
    "from clinik_local import TaskStore;"
    "s = TaskStore.open(':memory:'); s.tasks.create({'status': 'draft', 'intent': 'order'});"
    "print(clinik_local.__file__); print(len(m.schema_sql()))"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("clinik_local-*.whl")
    return built


def test_wheel_carries_schema_sql_inside_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "clinik_local/schema.sql" in names
    assert "clinik_local/py.typed" in names
    shipped = zipfile.ZipFile(wheel).read("clinik_local/schema.sql").decode()
    assert shipped == (ROOT / "schema.sql").read_text(encoding="utf-8")


def test_installed_wheel_finds_schema_sql_through_importlib_resources(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The wheel's copy comes first on the path; dependencies from this environment.
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    location, length = result.stdout.split()
    assert Path(location).parent == target / "clinik_local"  # not the source tree
    assert not (target / "schema.sql").exists()
    assert int(length) == len((ROOT / "schema.sql").read_text(encoding="utf-8"))


def test_source_tree_and_editable_install_find_the_top_level_schema_sql(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    location, length = result.stdout.split()
    assert Path(location).resolve() == ROOT / "clinik_local" / "__init__.py"
    assert int(length) == len((ROOT / "schema.sql").read_text(encoding="utf-8"))
