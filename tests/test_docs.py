"""Every Python block of README.md and docs/ runs offline and prints what its comments say; a block that cannot run
here (a server, another environment) says so in an `<!-- not run: why -->` line right above it."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not run[^\n]*-->\n)?```python\n(.*?)\n```", flags=re.DOTALL)
EXPECTED = re.compile(r"^\s*print\(.*\)\s+# (.+)$")  # `print(x)  # what it prints`: every print says it


def python_blocks() -> list:
    blocks = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            marks = [pytest.mark.skip(reason=match.group(1).strip())] if match.group(1) else []
            blocks.append(pytest.param(match.group(2), id=f"{page.relative_to(ROOT)}#{number}", marks=marks))
    return blocks


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [page.name for page in PAGES[1:] if f"](docs/{page.name})" not in readme] == []
    assert len(readme.splitlines()) <= 200


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to a missing {target}"


@pytest.mark.parametrize("code", python_blocks())
def test_python_block_runs_and_prints_what_it_says(code, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LLAVA_UHD_CACHE", str(tmp_path / "cache"))
    expected = [match.group(1) for line in code.splitlines() if (match := EXPECTED.match(line))]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
    assert [line.strip() for line in printed.getvalue().splitlines()] == expected
