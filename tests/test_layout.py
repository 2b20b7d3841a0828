"""The house by role: packages on floors, no import circle, command lines apart, every module in the layout table."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

from kiln.pipeline.codedeps import imports_of

KILN = ROOT / "src" / "kiln"
# Bottom to top: a package may import the ones before it (docs/development.md, "Where to look first").
FLOORS = ["core", "config", "data", "accuracy", "export", "runtimes", "measure", "serving", "pipeline", "diagnose", "report", "cli"]
# The registry table and the runtime protocols: importable from any floor because it imports nothing but core
# (config checks a target's runtime name against it). Its runtime packages are on the runtimes floor.
REGISTRY = "kiln.runtimes"


def modules() -> dict[str, Path]:
    found = {}
    for path in KILN.rglob("*.py"):
        parts = list(path.relative_to(KILN.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the kiln modules it imports when it runs (lazy imports too; annotation-only ones left out)."""
    mods = modules()
    return {m: {d for d in imports_of(p, m) if d in mods and d != m and not m.startswith(d + ".") and d != "kiln"} for m, p in mods.items()}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d) :] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_packages_import_only_the_floors_below():
    up = []
    for m, deps in import_graph().items():
        for d in deps:
            a, b = floor(m), floor(d)
            if a is not None and b is not None and b > a and d != REGISTRY:
                up.append(f"{m} -> {d}")
    assert not up, f"imports of a higher floor (move the code down, or the module up): {sorted(up)}"
    # The registry stays importable from below because it reaches nothing but core.
    reached = {d for d in import_graph()[REGISTRY] if floor(d) != FLOORS.index("core")}
    assert not reached, f"kiln.runtimes (the registry) imports {sorted(reached)}: only core may be below it"


def test_every_module_lives_in_a_package_by_role():
    flat = sorted(p.name for p in KILN.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not flat, f"put {flat} in the package for its role (docs/development.md)"
    packages = sorted(p.name for p in KILN.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(FLOORS + ["serving"]) or set(packages) == set(FLOORS), packages


def test_the_library_never_imports_the_command_lines():
    for path in KILN.rglob("*.py"):
        rel = path.relative_to(KILN)
        if rel.parts[0] == "cli" or rel == Path("__main__.py"):  # `python -m kiln <verb>` is the command itself
            continue
        text = path.read_text()
        assert "kiln.cli" not in text, path
        # A library module is not a command line: each one's is a verb in kiln/cli/.
        assert not re.search(r"^if __name__ == .__main__.:", text, re.M), f"{path}: move its command line into kiln/cli/"


def _docstring_only(path: Path) -> bool:
    import ast

    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body)


def test_every_module_is_in_the_layout_table():
    """docs/development.md says where to look for each part of the library: a new module must be placed there."""
    doc = (ROOT / "docs" / "development.md").read_text()
    table = doc[doc.index("Where to look first") :]
    rows: dict[str, str] = {}
    package = ""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 3 and not (cells[0] and set(cells[0]) <= {"-"}):
            package = cells[0].strip("`").rstrip("/") or package
            rows[package] = rows.get(package, "") + " " + cells[1] + " " + cells[2]
    missing = []
    for path in KILN.rglob("*.py"):
        rel = path.relative_to(KILN)
        if len(rel.parts) == 1 or (rel.name == "__init__.py" and len(rel.parts) == 2 and _docstring_only(path)):
            continue
        block = rows.get(rel.parts[0], "")
        if len(rel.parts) == 2:
            if f"`{rel.name}`" not in block:
                missing.append(rel.as_posix())
        elif f"`{rel.parts[1]}/`" not in block and "`<name>/`" not in block:
            missing.append(rel.as_posix())
    assert not missing, f"add {missing} to the layout table in docs/development.md"
    assert (ROOT / "README.md").read_text().count("\n") < 200
