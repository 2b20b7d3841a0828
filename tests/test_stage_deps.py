"""dvc.yaml lists, for every stage, the kiln code that stage can reach: a change there re-runs it.

The reach is read statically from the imports (at any depth, lazy ones too) of the stage's script,
through kiln's modules. A per-target stage reaches its target's runtime through the registry
(kiln.runtimes.get_runtime imports it by name): that is the `src/kiln/runtimes/${item.runtime}`
package, which must be a dependency of the stage template, plus what each runtime imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from kiln.runtimes import RUNTIMES

SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, module: str) -> set[str]:
    """kiln modules `path` (module `module`) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kiln"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kiln":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if module_file(f"{target}.{a.name}")}
    # A module imports its parent packages too.
    return {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 2)}


def reach(script: Path, module: str = "__main__", own: str | None = None) -> set[Path]:
    """Every kiln source file a script (or `module`) can import, the runtime packages but `own` left out."""
    seen: set[str] = set()
    todo = list(imports_of(script, module))
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        if name.startswith("kiln.runtimes.") and name.split(".")[2] in RUNTIMES and name.split(".")[2] != own:
            continue
        seen.add(name)
        if str(module_file(name).relative_to(ROOT)) not in HOW_NOT_WHAT:  # what those reach is theirs, not the stage's
            todo += imports_of(module_file(name), name)
    return {module_file(n).relative_to(ROOT) for n in seen}


# How a stage runs, not what it writes: refusing stale params, one-line errors, atomic writes, the paths
# (which dvc.yaml names itself) and the settings parser. A change here re-runs nothing, by design.
HOW_NOT_WHAT = {
    "src/kiln/stage.py",
    "src/kiln/params.py",
    "src/kiln/errors.py",
    "src/kiln/atomic.py",
    "src/kiln/paths.py",
    "src/kiln/settings.py",
    "src/kiln/__init__.py",
}


def covered(path: Path, deps: list[str]) -> bool:
    return str(path) in HOW_NOT_WHAT or any(path == Path(d) or Path(d) in path.parents for d in deps)


def stages() -> list[tuple[str, dict]]:
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items())


@pytest.mark.parametrize("name,stage", stages(), ids=[n for n, _ in stages()])
def test_every_stage_depends_on_the_code_it_reaches(name, stage):
    body = stage.get("do", stage)
    script = ROOT / body["cmd"].split()[1]
    deps = [d for d in body.get("deps", []) if isinstance(d, str)]
    assert covered(script.relative_to(ROOT), deps), f"{name} does not depend on its own script"
    missing = sorted(str(p) for p in reach(script) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage '{name}' reaches {missing} but does not depend on them"
    if "foreach" in stage and "kiln.runtimes" in {str(p) for p in reach(script)} | {"kiln.runtimes"}:
        per_runtime = "src/kiln/runtimes/${item.runtime}"
        assert per_runtime in deps, f"{name} reaches its target's runtime but does not depend on {per_runtime}"
        for runtime in RUNTIMES:
            package = ROOT / "src" / "kiln" / "runtimes" / runtime / "__init__.py"
            resolved = [d.replace("${item.runtime}", runtime) for d in deps]
            extra = sorted(str(p) for p in reach(package, f"kiln.runtimes.{runtime}", own=runtime) if not covered(p, resolved))
            assert not extra, f"dvc.yaml stage '{name}': runtime {runtime} reaches {extra}, which the stage does not depend on"
