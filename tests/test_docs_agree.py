"""The docs and the tests agree (issue 39): what docs/ says is tested names its test, and
the tests it names exist.

- every paragraph of docs/*.md that says something is tested names a test file
  (``tests/...py``) or a test function (``test_...``);
- every test file and test function the docs or the README name exists.

Whether a named test checks what its paragraph says is held by the tests
themselves (each was broken once on purpose: tests/MUTATION.md); this catches a
claim left without a test, and a renamed or removed test the docs still cite.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "tests" / "MUTATION.md"]
TEST_SOURCE = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))


def _paragraphs(path: Path) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", path.read_text()) if p.strip()]


@pytest.mark.parametrize("path", [p for p in DOCS if p.parent.name == "docs"],
                         ids=lambda p: p.name)  # fmt: skip
def test_each_claim_of_a_test_names_it(path: Path):
    bare = []
    for paragraph in _paragraphs(path):
        if re.search(r"\btested\b", paragraph, re.IGNORECASE) and not re.search(
            r"tests/\w+\.py|\btest_\w+", paragraph
        ):
            bare.append(paragraph.strip()[:160])
    assert bare == [], f"{path.name}: says 'tested' without naming the test: {bare}"


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: p.name)
def test_the_tests_the_docs_name_exist(path: Path):
    text = path.read_text()
    files = set(re.findall(r"\btests/(\w+\.py)", text))
    missing = [f for f in files if not (ROOT / "tests" / f).exists()]
    names = set(re.findall(r"`(test_\w+)`", text)) | set(re.findall(r"\((test_\w+)\)", text))
    gone = [n for n in names if not re.search(rf"def {n}\b", TEST_SOURCE)]
    assert (missing, gone) == ([], []), f"{path.name} names tests that do not exist"
