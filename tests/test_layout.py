"""The test tree's layout: shared code lives in `tests/support/`, so no test module imports
another test module (a helper found in one test file would otherwise be a hidden dependency
of the others), and `bench/` imports nothing from `tests/`."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[str]:
    """Every absolute module named by an import statement of the file, at any depth."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def is_support(module: str) -> bool:
    return module == "tests.support" or module.startswith("tests.support.")


def test_test_modules_import_only_support_from_tests() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        if "support" not in path.relative_to(REPO).parts
        for name in imported_modules(path)
        if name.startswith("tests.")
        and not is_support(name)
        # `from tests.support import forge` names the package first: its members are support too
        and not name.startswith("tests.support")
    ]
    assert offenders == []


def test_support_imports_no_test_module() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / "tests" / "support").rglob("*.py"))
        for name in imported_modules(path)
        if name.startswith("tests.") and not is_support(name)
    ]
    assert offenders == []


#: The one test-support module bench/ may import: the forger of nats-server authorization
#: requests, which the core benchmarks feed to the sans-I/O core (bench.core_cpu,
#: bench.record_overhead). The product has no such forger and a copy would be a second one.
BENCH_MAY_IMPORT = {"tests.support.forge"}


def test_bench_imports_nothing_else_from_tests() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / "bench").rglob("*.py"))
        for name in imported_modules(path)
        if (name == "tests" or name.startswith("tests."))
        and not any(name == ok or name.startswith(ok + ".") for ok in BENCH_MAY_IMPORT)
    ]
    assert offenders == []
