"""schema.sql is found from a built wheel, from an editable install and from a source checkout.

Each install goes into its own directory under tmp_path (``pip install --target``) and is
probed by a child interpreter that puts that directory first on ``sys.path``; the
dependencies (attrs, cattrs, apsw-sqlite3mc) come from the running environment, so nothing
but the build backend is fetched. (A ``venv --system-site-packages`` would see the base
interpreter's packages rather than this environment's, so it could not import the deps.)

One test goes the whole way instead (issue 14): a fresh ``python -m venv``, ``pip
install`` of the wheel with its dependencies, as a user would, then an encrypted and a
plaintext store in it.
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


#: Runs in the fresh virtualenv: one encrypted and one plaintext store, through the
#: installed wheel and the dependencies pip resolved for it.
_ENCRYPTION_PROBE = """
import sys
import apsw
import clinik_local
from clinik_local import EncryptionKeyError, TaskStore
from clinik_local.demo import SEED_LAB_ORDER

assert clinik_local.__file__.startswith(sys.prefix), clinik_local.__file__
with TaskStore.open("enc.db", key=lambda: "venv-key") as store:
    store.tasks.create(SEED_LAB_ORDER)
with TaskStore.open("plain.db") as store:
    store.tasks.create(SEED_LAB_ORDER)
with TaskStore.open("enc.db", key=lambda: "venv-key") as store:
    assert store.tasks.count().data == 1
try:
    TaskStore.open("enc.db", key=lambda: "wrong")
except EncryptionKeyError:
    pass
else:
    raise SystemExit("a wrong key opened the store")
print(apsw.mc_version)
print(open("enc.db", "rb").read(16) != b"SQLite format 3\\x00")
print(open("plain.db", "rb").read(16) == b"SQLite format 3\\x00")
"""


@pytest.mark.slow
def test_one_pip_install_of_the_wheel_into_a_fresh_venv_gives_encrypted_and_plain_stores(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    # The documented install: the wheel and its runtime dependencies, nothing else.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.lower()
    names = {line.split("==")[0].replace("_", "-") for line in installed.split()}
    assert "apsw-sqlite3mc" in names
    assert "apsw" not in names  # plain apsw would overwrite the cipher build's files
    result = subprocess.run(
        [str(python), "-c", _ENCRYPTION_PROBE],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    mc_version, encrypted, plain = result.stdout.splitlines()
    assert mc_version.startswith("SQLite3 Multiple Ciphers")
    assert (encrypted, plain) == ("True", "True")
