"""Each stage re-runs when code it reaches changes, and only then: kiln.pipeline.codedeps and dvc.yaml agree."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from kiln.pipeline import codedeps
from kiln.runtimes import RUNTIMES


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(stages()))
def test_every_stage_depends_on_its_code_digest(name):
    stage = stages()[name]
    body = stage.get("do", stage)
    script = body["cmd"].split()[1]
    if "foreach" in stage:
        assert codedeps.PER_TARGET[name] == script
        # calibrate iterates over pipeline.calibrate ({target: runtime}), the others over {target: {runtime, ...}}
        digest = (
            f"artifacts/code/{name}-${{item}}.json"
            if stage["foreach"] == "${pipeline.calibrate}"
            else f"artifacts/code/{name}-${{item.runtime}}.json"
        )
    else:
        assert codedeps.STAGES[name] == script
        digest = f"artifacts/code/{name}.json"
    deps = [d for d in body.get("deps", []) if isinstance(d, str)]
    assert digest in deps, f"dvc.yaml stage '{name}' does not depend on {digest}"
    # One mechanism: source files listed by hand would drift from what the stage really imports.
    assert not [d for d in deps if d.startswith(("src/", "stages/"))], deps


def ast_imports(path: Path, module: str) -> set[str]:
    """The same question as codedeps.imports_of, answered by Python's parser (slow, but certain)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    # Never run by a stage: annotation-only imports, and a library module's own command line.
    type_only = {
        id(n)
        for b in ast.walk(tree)
        if isinstance(b, ast.If) and ("TYPE_CHECKING" in ast.unparse(b.test) or ast.unparse(b.test) in ("__name__ == '__main__'",))
        for n in ast.walk(b)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kiln"}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            if target and target.split(".")[0] == "kiln":
                found |= {target} | {f"{target}.{a.name}" for a in node.names if codedeps.module_file(f"{target}.{a.name}")}
    return {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}


def test_the_fast_import_reader_agrees_with_the_parser():
    modules = sorted(codedeps.SRC.joinpath("kiln").rglob("*.py"))
    assert len(modules) > 30
    for path in modules:
        module = ".".join(path.relative_to(codedeps.SRC).with_suffix("").parts).removesuffix(".__init__")
        assert set(codedeps.imports_of(path, module)) == ast_imports(path, module), path


def test_each_digest_covers_what_its_stage_reaches_and_no_other_runtime():
    d = codedeps.digests(ROOT)
    assert set(d) == {f"{s}.json" for s in codedeps.STAGES} | {f"{s}-{r}.json" for s in codedeps.PER_TARGET for r in RUNTIMES}
    ort = d["build-onnxruntime.json"]["files"]
    assert {"stages/build.py", "kiln/pipeline/engine.py", "kiln/runtimes/onnxruntime/__init__.py", "kiln/runtimes/qdq.py"} <= set(ort)
    assert not [f for f in ort if f.startswith(("kiln/runtimes/torch", "kiln/runtimes/openvino", "kiln/export/models.py"))], ort
    torch_build = set(d["build-torch.json"]["files"])
    assert {"kiln/runtimes/torch/__init__.py", "kiln/runtimes/torch/compile.py", "kiln/export/models.py"} <= torch_build
    assert {"kiln/accuracy/budgets.py", "kiln/data/reference.py", "kiln/measure/benchmark.py"} <= set(d["benchmark-openvino.json"]["files"])
    # configure checks every runtime's options: it reaches them all.
    assert {f"kiln/runtimes/{r}/__init__.py" for r in RUNTIMES} <= set(d["configure.json"]["files"])
    # How a stage runs is not what it writes: a change to the error wording re-runs nothing.
    assert not [
        f for files in d.values() for f in files["files"] if f in ("kiln/core/errors.py", "kiln/core/atomic.py", "kiln/pipeline/stage.py")
    ]


def test_a_change_re_runs_exactly_the_stages_that_reach_it(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(codedeps.SRC / "kiln", src / "kiln", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    monkeypatch.setattr(codedeps, "SRC", src)
    codedeps.imports_of.cache_clear()
    before = codedeps.digests(tmp_path)
    report = src / "kiln" / "report" / "markdown.py"
    report.write_text(report.read_text() + "\n# changed\n")
    qdq = src / "kiln" / "runtimes" / "qdq.py"
    qdq.write_text(qdq.read_text() + "\n# changed\n")
    codedeps.imports_of.cache_clear()
    after = codedeps.digests(tmp_path)
    changed = {name for name in before if before[name]["sha256"] != after[name]["sha256"]}
    assert changed == {"report.json", "configure.json"} | {
        f"{s}-{r}.json" for s in codedeps.PER_TARGET for r in ("onnxruntime", "tensorrt")
    }
    codedeps.imports_of.cache_clear()


def test_the_probe_writes_the_digests_and_rewrites_only_what_changed(tmp_path):
    out = tmp_path / "code"
    codedeps.write_digests(out, ROOT)
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert len(files) == len(codedeps.STAGES) + len(codedeps.PER_TARGET) * len(RUNTIMES)
    (out / "gone.json").write_text("{}")
    codedeps.write_digests(out, ROOT)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == files
