"""The real DVC pipeline on a tiny model, in a temporary git repo: outputs, caching, the gate, experiments."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, TESTS, venv_env

from kiln.config.views import default_threads

pytestmark = pytest.mark.slow

TINY_MODEL = """\
name: null
entrypoint: tinymodels:tiny_cnn
checkpoint: null
weights: null
kwargs: {}
inputs:
  input: {shape: [3, 16, 16], dtype: float32}
outputs: [logits]
seed: 0
trained: false  # random weights: an entrypoint's are taken as trained unless told
"""


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(output: str) -> set[str]:
    # The probe lives in probe/dvc.yaml, so DVC calls it 'probe/dvc.yaml:probe'.
    return {name.split(":")[-1] for name in re.findall(r"Running stage '([^']+)'", output)}


def stale_stages(project: Path) -> set[str]:
    """The stages `dvc repro` would re-run now (their own dependencies changed), once the stages that decide it
    (probe, configure, data) have run: what a change re-runs, without paying for the re-run."""
    run(["dvc", "repro", "--single-item", "probe/dvc.yaml:probe", "configure", "data"], project)
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    return {name.split(":")[-1] for name in status} - {"probe"}


def make_project(tmp_path: Path, *overrides: str) -> Path:
    """A copy of this project with the tiny model and quick benchmark as its defaults, committed to git."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "stages", "src", "conf", "probe", "hydra_plugins"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, project / name)
    shutil.copy(TESTS / "tinymodels.py", project / "tinymodels.py")
    (project / "conf" / "model" / "tiny.yaml").write_text(TINY_MODEL)
    data = project / "conf" / "data" / "default.yaml"
    data.write_text(data.read_text().replace("resize: 256", "resize: 16").replace("crop: 224", "crop: 16"))
    config = project / "conf" / "config.yaml"
    config.write_text(
        config.read_text()
        .replace("- model: resnet18", "- model: tiny")
        .replace("- benchmark: default", "- benchmark: smoke")
        .replace("- tuning: default", "- tuning: smoke")
        .replace("- serving: default", "- serving: smoke")
    )
    (project / ".gitignore").write_text("/artifacts/\n__pycache__/\n")
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    run(["python", "-m", "kiln", "params", *overrides], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)
    return project


def test_pipeline_outputs_caching_and_experiments(tmp_path):
    project = make_project(tmp_path)
    import yaml

    # The default set tunes nothing (study=deep tunes the int8 and bf16 targets); one tuned target covers tuning
    # through DVC, in conf/ so that `dvc exp run` below composes it too.
    cpu = project / "conf" / "targets" / "cpu.yaml"
    cpu.write_text(
        cpu.read_text().replace(
            "    graph_optimization_level: all\nopenvino-int8:", "    graph_optimization_level: all\n  tune: true\nopenvino-int8:"
        )
    )
    run(["python", "-m", "kiln", "params"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tune onnxruntime-int8"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    targets = list(params["targets"])
    assert params["targets"]["onnxruntime-int8"]["tune"]
    assert {"torch-eager", "onnxruntime", "openvino", "onnxruntime-int8", "openvino-int8"} <= set(targets)
    # Only the int8 targets have a calibrate stage (params' derived pipeline.calibrate).
    int8 = {"onnxruntime-int8", "openvino-int8"}
    assert params["pipeline"]["calibrate"] == {"onnxruntime-int8": "onnxruntime", "openvino-int8": "openvino"}
    from_export = (
        {"export", "validate", "report"} | {f"calibrate@{t}" for t in int8} | {f"{s}@{t}" for s in ("build", "benchmark") for t in targets}
    )
    every_stage = {"probe", "peak", "sample-data", "data", "configure"} | from_export

    first = run(["dvc", "repro"], project)
    assert stages_run(first.stdout) == every_stage
    assert "exporter warnings" in first.stderr  # the export log is in the stage's output
    skipped = {t for t in targets if json.loads((project / "reports" / "runs" / f"{t}.json").read_text()).get("skipped")}
    assert skipped <= {t for t in targets if "bf16" in t or "fp16" in t}  # optional: only where the CPU lacks bf16/fp16
    for t in skipped:
        assert f"- `{t}`: " in (project / "reports" / "benchmark.md").read_text()
    for t in sorted(set(targets) - skipped):
        manifest = json.loads((project / "artifacts" / "engines" / t / "manifest.json").read_text())
        assert manifest["target"] == t and manifest["hardware"] and manifest["source_onnx_sha256"]
        # The metrics file holds the few headline figures `dvc exp show` should show; details are in runs/.
        metrics = json.loads((project / "reports" / "metrics" / f"{t}.json").read_text())
        headline = {
            "batch",
            "ms_per_image",
            "images_per_s",
            "top1_agreement",
            "served_images_per_s",
            "served_p99_ms",
            "ms_per_image_spread_pct",
        }
        costs = {"peak_rss_mb", "engine_mb", "load_s", "first_infer_ms", "build_s", "gmac_per_s", "max_rate_at_slo", "cost_per_million"}
        concurrent = {"throughput_images_per_s"} if manifest["runtime"] != "torch" else set()
        assert set(metrics) == headline | costs | concurrent, (t, set(metrics))
        assert metrics["batch"] == 8 and metrics["ms_per_image"] > 0
        run_ = json.loads((project / "reports" / "runs" / f"{t}.json").read_text())
        # What it costs: measured in this target's own process (its stage).
        assert 50 < metrics["peak_rss_mb"] < 8000 and metrics["engine_mb"] > 0 and metrics["load_s"] > 0
        assert run_["costs"]["added_mb"] >= 0 and run_["costs"]["memory_method"]
        assert run_["roofline"]["macs_per_image"] > 0 and run_["roofline"]["machine"]["peaks"]["fp32"]["macs_per_s"] > 0
        assert {"cv", "p99_over_p50", "noisy"} <= set(run_["latency"]["b8"])
        # Open loop (conf/serving/smoke.yaml): a rate within the 250 ms p99 objective and a recommended profile.
        open_loop = run_["open_loop"]
        assert metrics["max_rate_at_slo"] == pytest.approx(open_loop["max_rate_at_slo"], rel=1e-3) and open_loop["recommended"]["override"]
        assert open_loop["preprocessing"]["ms_per_image"] > 0
        if concurrent:
            assert run_["throughput"]["images_per_s"] > 0 and run_["throughput"]["requests_in_flight"] >= 1
        else:
            assert run_["throughput"]["images_per_s"] is None and "no concurrent mode" in run_["throughput"]["why"]
        # Only onnxruntime-int8 is tuned (above), on the smoke budget (test_tuning checks the search stops at it).
        if manifest.get("tuning"):
            assert t == "onnxruntime-int8"
            assert manifest["tuning"]["trials"] and manifest["tuning"]["budget_s"] == 4.0
            assert run_["tuning"] == manifest["tuning"]
        else:
            assert t != "onnxruntime-int8"
        for b in ("b1", "b4", "b8", "b32"):  # the smoke batch sizes and the profile's min/opt/max
            assert 0 < run_["latency"][b]["p50_ms"] <= run_["latency"][b]["p99_ms"]
        if manifest["precision"]["requested"] == "fp32":
            assert run_["accuracy"]["max_abs_err"] < 1e-3 and metrics["top1_agreement"] == 1.0
        elif manifest["precision"]["requested"] in ("bf16", "fp16"):  # run where the CPU has them natively: 8-10 bit mantissas
            assert run_["accuracy"]["max_abs_err"] < 0.1, (t, run_["accuracy"]["max_abs_err"])
        assert run_["served"]["requests"] >= 10 and set(run_["served"]["drawn"]) == {"1", "4"}
        assert run_["compiler"]["build_seconds"] > 0
        assert (project / "reports" / "plots" / f"{t}.csv").read_text().startswith("batch,ms_per_image")
        assert len(run_["times_ms"]["b1"]) >= 3
    report = (project / "reports" / "benchmark.md").read_text()
    assert all(f"| {t} |" in report for t in set(targets) - skipped) and "passed." in report
    assert "| torch-eager | torch | fp32 -> fp32 |" in report and "1.00x" in report
    assert "| onnxruntime-int8 | onnxruntime | int8 -> int8 |" in report
    assert "## Served traffic" in report and "## What each compiler did" in report
    for section in (
        "## Served under open-loop load",
        "## Why production can be slower",
        "## Throughput mode",
        "## Tuning: default against tuned settings",
        "## Roofline",
        "## What each engine costs",
    ):
        assert section in report, section
    facts = json.loads((project / "artifacts" / "peak.json").read_text())
    assert facts["peaks"]["fp32"]["macs_per_s"] > 1e9 and facts["clock"]["hz"] > 0
    assert (project / "reports" / "serving.csv").read_text().startswith("target,offered_rate,p99_ms,within_slo\n")
    summary = (project / "reports" / "summary.csv").read_text().splitlines()
    assert summary[0].endswith("throughput_images_per_s,peak_rss_mb,pct_of_peak")
    assert all(row.split(",")[-1] for row in summary[1:]), summary  # every engine's percent of peak
    assert (project / "reports" / "summary.csv").read_text().startswith("target,runtime,precision,batch,ms_per_image")
    assert "Accuracy against eager fp32, on 64 images from data/eval" in report
    assert len(list((project / "data" / "calibration").glob("*.jpg"))) == 300

    # Nothing changed: only the probe runs (how long that takes is measured by benchmarks/noop_repro.py).
    noop = run(["dvc", "repro"], project)
    assert stages_run(noop.stdout) == {"probe"}, noop.stdout

    # One target changed: only its stages and the report.
    run(["python", "-m", "kiln", "params", "targets.openvino.threads=1"], project)
    changed = run(["dvc", "repro"], project)
    assert stages_run(changed.stdout) == {"probe", "configure", "build@openvino", "benchmark@openvino", "report"}
    assert json.loads((project / "reports" / "runs" / "openvino.json").read_text())["threads"] == 1

    # New calibration data (other photographs: different activation ranges): calibration re-runs,
    # and only the int8 targets re-build.
    eval_images = sorted((project / "data" / "eval").glob("*.jpg"))
    for i, image in enumerate(sorted((project / "data" / "calibration").glob("*.jpg"))):
        image.write_bytes(eval_images[i % len(eval_images)].read_bytes())
    first_image = project / "data" / "calibration" / "0000.jpg"
    recal = run(["dvc", "repro"], project)
    assert stages_run(recal.stdout) == {"probe", "sample-data", "data", "report"} | {f"calibrate@{t}" for t in int8} | {
        f"{s}@{t}" for s in ("build", "benchmark") for t in int8
    }
    assert "data/calibration holds 300 images: left as it is" in recal.stderr
    assert first_image.read_bytes() == (project / "data" / "eval" / "0000.jpg").read_bytes()

    # The model changed (in conf/, where `dvc exp run` will find it too): every stage from export on reads it
    # (the report only through their outputs). Checked without paying for a second full run, then undone.
    tiny = project / "conf" / "model" / "tiny.yaml"
    original = tiny.read_text()
    tiny.write_text(original.replace("kwargs: {}", "kwargs: {num_classes: 5}"))
    run(["python", "-m", "kiln", "params", "targets.openvino.threads=1"], project)
    assert stale_stages(project) == from_export - {"report"}
    tiny.write_text(original)
    run(["python", "-m", "kiln", "params", "targets.openvino.threads=1"], project)
    assert stale_stages(project) == set()

    # An experiment with Hydra overrides re-composes params.yaml (DVC's composition, with kiln's resolvers
    # from hydra_plugins/) and re-runs one target: made int8, it gets a calibrate stage.
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one target changed"], project)
    exp = run(["dvc", "exp", "run", "-S", "targets.openvino.threads=2", "-S", "targets.openvino.precision=int8"], project)
    assert stages_run(exp.stdout) == {"probe", "configure", "calibrate@openvino", "build@openvino", "benchmark@openvino", "report"}
    composed = yaml.safe_load((project / "params.yaml").read_text())
    assert composed["targets"]["openvino"]["threads"] == 2 and composed["pipeline"]["calibrate"]["openvino"] == "openvino"
    # capped at the cores this process may use (a pinned pytest-xdist worker has one: conftest.pin_xdist_worker)
    assert json.loads((project / "reports" / "runs" / "openvino.json").read_text())["threads"] == min(2, default_threads())

    # conf/ edited but params.yaml not re-composed: a plain `dvc repro` says so instead of using stale values.
    tiny.write_text(tiny.read_text().replace("seed: 0", "seed: 3"))
    stale = run(["dvc", "repro"], project, check=False)
    assert stale.returncode != 0 and "params.yaml may be stale: conf/model/tiny.yaml changed after it was written" in stale.stderr
    tiny.write_text(tiny.read_text().replace("seed: 3", "seed: 0"))

    # A target set that shrinks leaves no stale per-target results behind.
    run(
        [
            "python",
            "-m",
            "kiln",
            "params",
            "targets.openvino.threads=2",
            "targets.openvino.precision=int8",
            "~targets.openvino-fp16",
            "~targets.onnxruntime",
        ],
        project,
    )
    shrunk = run(["dvc", "repro"], project)
    assert stages_run(shrunk.stdout) == {"probe", "configure", "report"}
    assert not (project / "reports" / "metrics" / "onnxruntime.json").exists()
    assert not (project / "reports" / "plots" / "onnxruntime.csv").exists()
    assert not [ln for ln in (project / "reports" / "benchmark.md").read_text().splitlines() if ln.startswith("| onnxruntime |")]


def test_validation_gate_stops_the_pipeline(tmp_path):
    project = make_project(tmp_path, "model.entrypoint=tinymodels:batch_size_arithmetic", "export.exporter=torchscript")
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    ran = stages_run(result.stdout)
    assert {"export", "validate"} <= ran <= {"probe", "peak", "sample-data", "data", "configure", "export", "validate"}, ran
    error = [ln for ln in result.stderr.splitlines() if ln.startswith("kiln: error:")]
    assert len(error) == 1 and "froze a batch-dependent shape" in error[0]
    assert not (project / "artifacts" / "engines").exists()
    assert not (project / "reports" / "validate.json").exists()
    assert not (project / "artifacts" / "reference.npz").exists()


def test_unknown_model_fails_export_with_one_line(tmp_path):
    project = make_project(tmp_path, "model.entrypoint=null", "model.name=resnet81")
    result = run(["dvc", "repro", "export"], project, check=False)
    assert result.returncode != 0
    assert "kiln: error: unknown model.name 'resnet81' (did you mean 'resnet18'" in result.stderr
    assert not (project / "artifacts" / "model.onnx").exists()
