"""The cache's contract on a real DVC project: a change re-runs exactly the stages that read it.

One small project (three targets, the tiny model with a checkpoint, a calibration folder outside the
project) is built once; each change is then applied, the stages that decide what is stale (probe,
configure, data) are run, and `dvc status` must name exactly the stages that read the change.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, venv_env
from PIL import Image
from test_pipeline import make_project, run, stages_run, stale_stages

pytestmark = pytest.mark.slow

KEEP = ("torch-eager", "onnxruntime", "onnxruntime-int8")
MODULE = '''"""The user's own model code, edited in place by the test."""
from tinymodels import TinyCNN


def build():
    return TinyCNN()
'''


def write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from kiln.config.params import compose

    root = tmp_path_factory.mktemp("contract")
    calibration = root / "my-calibration"  # outside the project: digested wherever it is
    write_images(calibration, 24, seed=1)
    drop = [f"~targets.{n}" for n in compose(config_dir=ROOT / "conf")["targets"] if n not in KEEP]
    project = make_project(
        root,
        *drop,
        "model.entrypoint=mymodels:build",
        "model.checkpoint=ckpt.pt",
        f"data.calibration_dir={calibration}",
        "calibration.subset_size=16",
        "serving.enabled=false",
        "targets.onnxruntime-int8.tune=true",  # the default set tunes nothing: one tuned target reads the tuning block
    )
    (project / "mymodels.py").write_text(MODULE)
    from tinymodels import TinyCNN

    torch.manual_seed(0)
    torch.save(TinyCNN().state_dict(), project / "ckpt.pt")
    trace = root / "trace"  # every stage writes the kiln modules it ran (kiln.pipeline.stage.TRACE)
    first = subprocess.run(
        ["dvc", "repro"], cwd=project, env={**venv_env(), "KILN_TRACE_IMPORTS": str(trace)}, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stdout + first.stderr
    return {"root": project, "calibration": calibration, "trace": trace}


def test_each_stage_digest_covers_the_code_it_ran_and_no_stage_reaches_the_repair(project):
    from kiln.pipeline import codedeps

    root = project["root"]
    targets = yaml.safe_load((root / "params.yaml").read_text())["targets"]
    digests = {p.stem: set(json.loads(p.read_text())["files"]) for p in (root / "artifacts" / "code").glob("*.json")}
    # What kiln's own plumbing imports (refusing stale params, errors, atomic writes) decides how a stage runs, not
    # what it writes: left out of the digests on purpose (codedeps.HOW_NOT_WHAT).
    plumbing = {m for name in codedeps.HOW_NOT_WHAT if (f := codedeps.module_file(name)) for m in codedeps.imports_of(f, name)}
    traces = {p.stem: json.loads(p.read_text()) for p in project["trace"].glob("*.json")}
    assert {"export", "validate", "configure", "data", "report", "benchmark@onnxruntime-int8", "calibrate@onnxruntime-int8"} <= set(traces)
    for stage, modules in traces.items():
        if stage == "probe":  # its dependencies are listed in probe/dvc.yaml
            continue
        name, _, target = stage.partition("@")
        digest = digests[f"{name}-{targets[target]['runtime']}" if target else name]
        ran = {
            codedeps.module_file(m).relative_to(codedeps.SRC).as_posix()
            for m in modules
            if m not in codedeps.HOW_NOT_WHAT and m not in plumbing and codedeps.module_file(m)
        }
        assert ran <= digest, f"{stage} ran code its digest leaves out (a stale result waiting): {sorted(ran - digest)}"
    # Command lines are apart from the library: an edit of the repair search re-runs no stage.
    assert not [f for files in digests.values() for f in files if f == "kiln/diagnose/repair.py" or f.startswith("kiln/cli/")]


def test_each_change_re_runs_exactly_the_stages_that_read_it(project):
    root = project["root"]
    assert stale_stages(root) == set()
    params = (root / "params.yaml").read_text()
    benchmarks = {f"benchmark@{t}" for t in KEEP}
    for override, expected in (
        ("serving.slo_ms=100", benchmarks),  # once missed: configure did not track serving
        ("tuning.budget_s=5", {"build@onnxruntime-int8"}),  # the only tuned target of the three
        ("benchmark.min_time_s=0.8", benchmarks),
        ("calibration.method=entropy", {"calibrate@onnxruntime-int8"}),
        ("validate.atol=0.001", {"validate"}),
        ("report.baseline=onnxruntime", {"report"}),
    ):
        out = run([sys.executable, "-m", "kiln", "params", override], root)
        # It says what will re-run, before `dvc status` can (configure has not run yet).
        said = next(line for line in out.stdout.splitlines() if "re-runs" in line)
        assert stale_stages(root) == expected, override
        for stage in expected:
            assert stage.split("@")[0] in said, (override, said)
        (root / "params.yaml").write_text(params)
        assert stale_stages(root) == set(), override

    # Files params name but do not hold: the checkpoint, the entrypoint's source, a custom image folder.
    from_model = {"export", "validate", "build@torch-eager"}  # ONNX Runtime builds from the graph, not the model
    checkpoint = root / "ckpt.pt"
    saved = checkpoint.read_bytes()
    from tinymodels import TinyCNN

    torch.manual_seed(1)
    torch.save(TinyCNN().state_dict(), checkpoint)  # retrained into the same path
    assert stale_stages(root) == from_model
    checkpoint.write_bytes(saved)
    assert stale_stages(root) == set()
    module = root / "mymodels.py"
    module.write_text(MODULE + "\n# edited in place\n")
    assert stale_stages(root) == from_model
    module.write_text(MODULE)
    assert stale_stages(root) == set()
    write_images(project["calibration"], 24, seed=2)
    # The data stage digests the folder; its digest is what calibration depends on.
    assert json.loads(run(["dvc", "status", "--json"], root).stdout).keys() - {"probe/dvc.yaml:probe"} == {"data"}
    assert stale_stages(root) == {"calibrate@onnxruntime-int8"}
    write_images(project["calibration"], 24, seed=1)  # the images the project was built with, byte for byte
    assert stale_stages(root) == set()


def test_a_missing_folder_or_file_fails_configure_with_one_line(project):
    root = project["root"]
    params = (root / "params.yaml").read_text()
    try:
        for override, message in (
            ("data.eval_dir=no/such/folder", "data.eval_dir: folder 'no/such/folder' not found"),
            ("model.checkpoint=gone.pt", "model.checkpoint: file 'gone.pt' not found"),
            ("model.entrypoint=nosuchmodule:build", "model.entrypoint: module 'nosuchmodule' not found"),
        ):
            run([sys.executable, "-m", "kiln", "params", override], root)
            result = run(["dvc", "repro", "configure"], root, check=False)
            errors = [line for line in result.stderr.splitlines() if line.startswith("kiln: error:")]
            assert result.returncode != 0 and len(errors) == 1 and message in errors[0], (override, result.stderr)
            (root / "params.yaml").write_text(params)
    finally:
        (root / "params.yaml").write_text(params)
    assert stale_stages(root) == set()


def test_two_params_calls_keep_the_first_override(project):
    root = project["root"]
    params = (root / "params.yaml").read_text()
    try:
        run([sys.executable, "-m", "kiln", "params", "serving.slo_ms=100"], root)
        second = run([sys.executable, "-m", "kiln", "params", "benchmark.min_time_s=0.8"], root)
        composed = yaml.safe_load((root / "params.yaml").read_text())
        assert composed["serving"]["slo_ms"] == 100 and composed["benchmark"]["min_time_s"] == 0.8
        assert "kept the overrides params.yaml held: " in second.stdout and "serving.slo_ms=100" in second.stdout
        run([sys.executable, "-m", "kiln", "params", "--reset"], root)
        assert yaml.safe_load((root / "params.yaml").read_text())["serving"]["slo_ms"] == 250
    finally:
        (root / "params.yaml").write_text(params)


ORPHAN_STAGE = """\
import subprocess, sys, time
from pathlib import Path
from kiln.pipeline.stage import run_stage

def main():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path("pids").write_text(f"{__import__('os').getpid()} {child.pid}")
    time.sleep(120)

run_stage(main)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_kill_9_of_dvc_repro_leaves_no_orphan(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    (tmp_path / "stage.py").write_text(ORPHAN_STAGE)
    (tmp_path / "dvc.yaml").write_text("stages:\n  slow:\n    cmd: python stage.py\n    outs: [never.txt]\n")
    dvc = subprocess.Popen(["dvc", "repro"], cwd=tmp_path, env=venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pids").is_file() or len((tmp_path / "pids").read_text().split()) < 2:
            assert time.monotonic() < deadline and dvc.poll() is None, "the stage did not start"
            time.sleep(0.1)
        stage, child = map(int, (tmp_path / "pids").read_text().split())
        assert alive(stage) and alive(child)
        os.kill(dvc.pid, signal.SIGKILL)
        dvc.wait()
        deadline = time.monotonic() + 10
        while (alive(stage) or alive(child)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(stage) and not alive(child), "the stage or its child ran on after dvc repro was killed"
    finally:
        for pid in (dvc.pid,):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_an_entrypoint_model_whose_int8_collapses_fails_at_the_budget(tmp_path, digits_trained):
    """The most common way people bring a model: an entrypoint that loads its own trained weights. Kiln cannot
    see that they are trained, so it takes them as trained and enforces the budget (it used not to)."""
    from digits import PREPROCESS
    from outlier import write_outlier_checkpoint

    from kiln.config.params import compose

    dirs = digits_trained["dirs"]
    weights = write_outlier_checkpoint(digits_trained["model"], tmp_path / "weights.pt")
    project = make_project(
        tmp_path,
        *[f"~targets.{n}" for n in compose(config_dir=ROOT / "conf")["targets"] if n != "onnxruntime-int8"],
        "model.entrypoint=mymodel:model",
        "~model.trained",
        f"data.calibration_dir={dirs['calibration']}",
        f"data.eval_dir={dirs['eval']}",
        "data.eval_limit=200",
        "data.preprocess.mean=[0.5,0.5,0.5]",
        "data.preprocess.std=[0.5,0.5,0.5]",
        "report.baseline=onnxruntime-int8",
        "serving.enabled=false",
        "targets.onnxruntime-int8.tune=false",
    )
    assert PREPROCESS["mean"] == [0.5, 0.5, 0.5]
    (project / "mymodel.py").write_text(
        f"import torch\nfrom digits import digits_cnn\n\n\ndef model():\n    m = digits_cnn()\n"
        f"    m.load_state_dict(torch.load({str(weights)!r}))\n    return m\n"
    )
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert "benchmark@onnxruntime-int8" in stages_run(result.stdout)
    errors = [line for line in result.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1 and "target 'onnxruntime-int8' is over its accuracy budget" in errors[0], result.stderr
    assert "first divergent boundary" in errors[0]
    assert "taken as trained: model.entrypoint builds the model" in result.stderr  # which rule applied, in the log
    assert not (project / "reports" / "metrics" / "onnxruntime-int8.json").exists()
