"""What kiln code each stage reaches, as one digest file per stage that dvc.yaml depends on.

A stage must re-run when code it runs changes, and only then. Which modules a stage script can reach
is read from the imports (at any depth, lazy ones too) through kiln's modules; a per-target stage
reaches its target's runtime package through the registry, so those stages get one digest per
runtime. The probe writes `artifacts/code/<stage>.json` (and `<stage>-<runtime>.json`) on every
`dvc repro`: one small dependency per stage instead of a dozen source files, which DVC would check
one by one (about 1.4 ms each, 40 stages over). The file changes only when a reached file does.

Modules that decide how a stage runs but not what it writes are left out on purpose (HOW_NOT_WHAT):
refusing stale params, one-line errors, atomic writes, the paths (which dvc.yaml names itself), the
settings parser. Stdlib only: the probe imports no framework.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from kiln.core.hashing import digest_files
from kiln.runtimes import RUNTIMES

# The kiln that runs (an editable checkout's src/ or site-packages): its files are what a stage executes.
SRC = Path(__file__).resolve().parents[2]
# stage (as dvc.yaml names it) -> its script; the per-target stages get one digest per runtime.
STAGES = {
    "sample-data": "stages/sample_data.py",
    "data": "stages/data.py",
    "configure": "stages/configure.py",
    "export": "stages/export.py",
    "validate": "stages/validate.py",
    "peak": "stages/peak.py",
    "report": "stages/report.py",
}
PER_TARGET = {"calibrate": "stages/calibrate.py", "build": "stages/build.py", "benchmark": "stages/benchmark.py"}
HOW_NOT_WHAT = frozenset(
    {
        "kiln",
        "kiln.pipeline.stage",
        "kiln.config.params",
        "kiln.core.errors",
        "kiln.core.atomic",
        "kiln.core.paths",
        "kiln.core.settings",
        "kiln.pipeline.codedeps",
        "kiln.config.slices",
    }
)
# ...except where it is what the stage writes: configure writes the params slices kiln.config.slices declares
# (and a changed slice re-runs its stage, so the others need not depend on the declaration).
WHAT_FOR = {"configure": frozenset({"kiln.config.slices"})}


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)"
    r"(?:from[ \t]+(?P<src>\.+[\w.]*|kiln[\w.]*)[ \t]+import[ \t]+(?P<names>\([^)]*\)|[^\n#]+)|import[ \t]+(?P<mod>kiln[\w.]*))",
    re.M,
)
# Blocks a stage never runs: annotation-only imports, and a library module's own command line (a stage
# imports the module; it never runs it as __main__).
_TYPE_CHECKING = re.compile(r"^(?P<indent>[ \t]*)if[ \t]+(?:typing\.)?TYPE_CHECKING[ \t]*:", re.M)
_NOT_RUN = re.compile(r"^(?P<indent>[ \t]*)if[ \t]+(?:(?:typing\.)?TYPE_CHECKING|__name__[ \t]*==[ \t]*[\"']__main__[\"'])[ \t]*:", re.M)


@lru_cache(maxsize=None)
def imports_of(path: Path, module: str) -> frozenset[str]:
    """kiln modules `path` (module `module`) imports anywhere in its body, annotation-only imports and the
    `if __name__ == "__main__":` block left out.
    Read with regular expressions, not `ast`: the probe runs this on every `dvc repro` (ast took 0.2 s)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    text = path.read_text(encoding="utf-8")
    # Lines inside those blocks (deeper-indented than the `if`) are never imported when a stage runs.
    skipped: list[tuple[int, int]] = []
    for m in (_TYPE_CHECKING if module == "__main__" else _NOT_RUN).finditer(text):
        indent = len(m.group("indent"))
        lines = text[m.end() :].splitlines(keepends=True)
        end = m.end() + (len(lines[0]) if lines else 0)  # the rest of the `if` line
        for line in lines[1:]:
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            end += len(line)
        skipped.append((m.start(), end))
    found: set[str] = set()
    for m in _IMPORT.finditer(text):
        if any(a <= m.start() < b for a, b in skipped):
            continue
        if m.group("mod"):
            found.add(m.group("mod"))
            continue
        src = m.group("src")
        level = len(src) - len(src.lstrip("."))
        if level:
            parts = package.split(".")
            target = ".".join(parts[: len(parts) - level + 1] + ([src[level:]] if src[level:] else []))
        else:
            target = src
        found.add(target)
        for name in m.group("names").strip("() \n").replace("\n", " ").split(","):
            name = name.split(" as ")[0].strip()
            if name and module_file(f"{target}.{name}"):
                found.add(f"{target}.{name}")
    # Importing a module imports its parent packages.
    return frozenset(".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2))


def reach(script: Path, runtimes: tuple[str, ...] = (), keep: frozenset[str] = frozenset()) -> list[Path]:
    """The kiln source files `script` can import, with these runtimes' packages (reached through the registry,
    by name) and those it imports by statement (the peak stage's OpenVINO helpers); HOW_NOT_WHAT left out,
    but for `keep`."""
    seen: set[str] = set()
    todo = list(imports_of(script, "__main__")) + [f"kiln.runtimes.{rt}" for rt in runtimes]
    while todo:
        name = todo.pop()
        if name in seen or (name in HOW_NOT_WHAT and name not in keep) or module_file(name) is None:
            continue
        seen.add(name)
        todo += imports_of(module_file(name), name)  # type: ignore[arg-type]
    return sorted(module_file(n) for n in seen)  # type: ignore[type-var]


def digests(root: Path = Path(".")) -> dict[str, dict[str, object]]:
    """File name under artifacts/code -> {sha256, files} for every stage (and runtime, per target); stage
    scripts under the project `root`, kiln's modules where kiln is imported from."""
    # configure checks every target's options: it loads every runtime (by name, through the registry).
    jobs = {f"{name}.json": (name, root / script, tuple(RUNTIMES) if name == "configure" else ()) for name, script in STAGES.items()}
    jobs |= {f"{name}-{rt}.json": (name, root / script, (rt,)) for name, script in PER_TARGET.items() for rt in RUNTIMES}
    out = {}
    for file, (stage, script, runtimes) in jobs.items():
        files = reach(script, runtimes, WHAT_FOR.get(stage, frozenset()))
        named = {script.relative_to(root).as_posix(): script} | {m.relative_to(SRC).as_posix(): m for m in files}
        out[file] = {"sha256": digest_files(named), "files": list(named)}
    return out


def write_digests(out_dir: Path, root: Path = Path(".")) -> None:
    """Write each stage's digest file, rewriting only those that changed."""
    from kiln.core.atomic import write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = digests(root)
    for stale in {p.name for p in out_dir.glob("*.json")} - set(wanted):
        (out_dir / stale).unlink()
    for name, data in wanted.items():
        text = json.dumps(data, indent=1) + "\n"
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
