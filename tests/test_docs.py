"""Docs coverage: every Python example in README.md and docs/*.md runs, as written.

Fence conventions (also stated in docs/README.md):

* ```` ```python ```` blocks are executed. The blocks of one page run in order in one
  namespace (a page reads like one session), in a fresh empty working directory.
* ```` ```python test ```` blocks are pytest modules: each runs in an inner pytest
  session (pytester) with clinik-local's plugin, and every test in it must pass.
* ```` ```python no-run ```` blocks are compiled (syntax-checked) but not run.

Anything else after ``python`` is an error, so a typo cannot silently skip a block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import clinik_local

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
USER_PAGES = ("embedding.md", "offline-sync.md", "testing.md", "api.md", "fhir.md")
_FENCE = re.compile(r"^```python(?P<info>[^\n`]*)\n(?P<code>.*?)^```\s*$", re.M | re.S)
_MODES = {"": "run", "test": "test", "no-run": "no-run"}


class Block:
    """One fenced Python block of a page."""

    def __init__(self, page: Path, line: int, mode: str, code: str) -> None:
        self.page, self.line, self.mode, self.code = page, line, mode, code

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The Python blocks of a page, in order; an unknown fence info string fails."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        info = match.group("info").strip()
        if info not in _MODES:
            raise AssertionError(f"{page.name}:{line}: unknown fence '```python {info}'")
        found.append(Block(page, line, _MODES[info], match.group("code")))
    return found


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_user_page_exists_and_has_runnable_examples() -> None:
    for name in USER_PAGES:
        page = ROOT / "docs" / name
        assert page.is_file(), f"docs/{name} is missing"
        assert any(b.mode != "no-run" for b in blocks(page)), f"docs/{name} runs nothing"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_python_examples_of_the_page_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for block in blocks(page):
        compiled = compile(block.code, block.where, "exec")
        if block.mode == "run":
            exec(compiled, namespace)  # the page's own example, as written


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(b.mode == "test" for b in blocks(p))], ids=_page_id
)
def test_test_examples_of_the_page_pass_under_pytest(page: Path, pytester: pytest.Pytester) -> None:
    test_blocks = [b for b in blocks(page) if b.mode == "test"]
    stem = page.stem.replace("-", "_")
    # one module per block (blocks may reuse names), one inner session for the page
    pytester.makepyfile(**{f"test_doc_{stem}_{n}": b.code for n, b in enumerate(test_blocks)})
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error", "-rA")
    outcomes = result.parseoutcomes()
    report = "\n".join(result.outlines[-40:])
    assert result.ret == 0, report
    passed_modules = {
        line.split("::")[0].split()[-1] for line in result.outlines if line.startswith("PASSED ")
    }
    assert passed_modules == {f"test_doc_{stem}_{n}.py" for n in range(len(test_blocks))}, report
    assert outcomes["passed"] >= len(test_blocks)


def test_api_reference_names_every_public_name() -> None:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in clinik_local.__all__ if f"`{name}" not in text]
    assert missing == [], f"docs/api.md does not document: {missing}"


def test_fence_parser_sees_modes_and_rejects_typos(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n\n```python test\ndef test_a(): pass\n```\n"
        "```python no-run\nimport nowhere\n```\n```bash\necho hi\n```\n",
        encoding="utf-8",
    )
    assert [b.mode for b in blocks(page)] == ["run", "test", "no-run"]
    page.write_text("```python norun\nx = 1\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="unknown fence"):
        blocks(page)
