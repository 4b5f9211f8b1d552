"""docs/protocol.md is the project's own protocol notes, cited by section from the code: it keeps
the sections §0-§10, every test it names as evidence exists, and it cites nothing outside the
repository. Pure file reads."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"
TEXT = DOC.read_text()

# `tests/e2e/test_forgery.py::test_missing_signature_denied`
TEST_REF = re.compile(r"\b(tests/[\w/]+\.py)::(\w+)")
# Any other path of this repository the notes point at: `callout/jwt.py`, `tests/replay/cases/`...
REPO_PATH = re.compile(r"`((?:callout|tests|deploy|docs|bench)/[\w./*-]*)`")
SECTION = re.compile(r"^## §(\d+) ", re.MULTILINE)


@functools.cache
def defined_tests(path: str) -> frozenset[str]:
    """The module-level test functions of a test file."""
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    functions = (n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return frozenset(f.name for f in functions if f.name.startswith("test_"))


def test_sections_are_0_to_10_in_order() -> None:
    assert [int(n) for n in SECTION.findall(TEXT)] == list(range(11))


def test_every_test_reference_names_an_existing_test() -> None:
    refs = set(TEST_REF.findall(TEXT))
    assert len(refs) > 50  # the pattern matches the notes' references
    missing = sorted(
        f"{path}::{name}"
        for path, name in refs
        if not (ROOT / path).is_file() or name not in defined_tests(path)
    )
    assert not missing, f"docs/protocol.md names tests that do not exist: {missing}"


def test_every_repository_path_exists() -> None:
    paths = {p.split("::")[0] for p in REPO_PATH.findall(TEXT)}
    assert "callout/decision.py" in paths or "callout/jwt.py" in paths
    missing = sorted(
        p for p in paths if not any(ROOT.glob(p.rstrip("/"))) and not (ROOT / p).exists()
    )
    assert not missing, f"docs/protocol.md names paths that do not exist: {missing}"


def test_nothing_outside_the_repository_is_cited() -> None:
    assert re.search(r"https?://", TEXT) is None
    assert "shared/" not in TEXT
    assert re.search(r"\bserver/\w+\.go\b", TEXT) is None  # another repository's source files


def test_no_file_cites_a_document_outside_the_repository() -> None:
    """The code and docs cite docs/protocol.md, never background material kept elsewhere."""
    # Built from parts, so that this file does not match itself.
    shared = "shared" + "/"
    outside = re.compile(rf"{shared}protocol\.md|/work/{shared}|(?<![\w/])protocol\.md\s*§")
    offenders = []
    for path in sorted(ROOT.glob("**/*")):
        parts = set(path.relative_to(ROOT).parts)
        if not path.is_file() or parts & {".git", ".venv", "build", "node_modules"}:
            continue
        if path.suffix not in {".py", ".md", ".conf", ".yml", ".json", ".js", ".go", ""}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in outside.finditer(text)]
    assert offenders == []
