"""The Code map's import rules (docs/development.md): each package imports only the ones before it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
# What each part may import of ours (besides itself); docs/development.md's Code map says the same.
ALLOWED = {
    "config": set(),
    "storage": set(),
    "data": {"config"},
    "model": {"data"},
    "training": {"data", "model"},
    "tracking": {"config", "storage"},
    "tuning": {"config", "storage", "data", "model", "training", "tracking"},
    "registry": {"data", "model", "training"},
    "serving": {"config", "data", "registry"},
    "testkit": set(),  # what tests, bench/ and docs/screenshots.py share
}
STAGES = {"tune", "compare", "train_best", "evaluate"}


def part_of(path: Path) -> str:
    """config, data, ..., or serving: the Code map's row of a source file."""
    relative = path.relative_to(ROOT).with_suffix("").parts
    return relative[0] if relative[0] == "serving" else relative[1]


def imported_parts(path: Path) -> set[str]:
    """The parts of ours a file imports (`from pipeline.data import x`, `from pipeline import tune`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = node.module.split(".")
            if names[0] == "pipeline":
                found |= {names[1]} if len(names) > 1 else {a.name for a in node.names}
            elif names[0] == "serving":
                found.add("serving")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "pipeline" and len(names) > 1:
                    found.add(names[1])
    return found


def test_packages_import_only_what_the_code_map_allows() -> None:
    broken = []
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("serving/*.py")]:
        part = part_of(path)
        if part in STAGES | {"cli", "__init__", "errors"}:
            continue
        extra = imported_parts(path) - ALLOWED[part] - {part, "errors"}  # errors: everyone's
        if extra:
            broken.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not broken, broken


def test_stages_are_not_imported_by_the_packages_under_them() -> None:
    for path in ROOT.glob("pipeline/*/*.py"):
        assert not imported_parts(path) & (STAGES | {"cli"}), path


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, by its full dotted name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_tests_do_not_import_bench_or_each_other() -> None:
    """Shared helpers live in tests/conftest.py (or pipeline/testkit.py, shared with bench/ and
    docs/); bench/ is a user of the code, not a library."""
    for path in (ROOT / "tests").glob("test_*.py"):
        for module in imported_modules(path):
            assert not module.startswith(("bench", "tests.test_")), f"{path.name}: {module}"


def test_bench_and_docs_do_not_import_the_tests() -> None:
    """What they share with the tests is in pipeline/testkit.py: tests/ is no library."""
    for path in [*ROOT.glob("bench/*.py"), *ROOT.glob("docs/*.py")]:
        for module in imported_modules(path):
            assert module.split(".")[0] != "tests", f"{path.relative_to(ROOT)}: {module}"
