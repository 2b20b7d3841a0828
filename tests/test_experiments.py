"""Sweeps with `dvc exp run --queue`, `dvc exp show` and `dvc metrics diff`, and what a bad sweep says."""

from __future__ import annotations

import json
import time

import pytest
from conftest import ROOT, copy_project
from test_pipeline import run, stages_run

from kiln.config.params import compose
from kiln.config.views import Target
from kiln.core.errors import KilnError
from kiln.measure.benchmark import significant


def test_a_sweep_over_a_misspelt_target_key_names_the_key():
    with pytest.raises(
        KilnError, match=r"(?s)Could not override 'targets.openvino.precison'.*'targets.openvino.precison' \(did you mean 'precision'\?\)"
    ):
        compose(["targets.openvino.precison=int8"], config_dir=ROOT / "conf")
    params = compose(["+targets.openvino.precison=int8"], config_dir=ROOT / "conf")  # appended on purpose...
    with pytest.raises(KilnError, match=r"targets.openvino has unknown keys \['precison'\] \(did you mean 'precision'\?\)"):
        Target.from_params("openvino", params)  # ...the configure stage refuses it before anything builds


def test_a_target_set_that_does_not_exist_lists_the_ones_that_do():
    with pytest.raises(KilnError, match=r"(?s)Could not find 'targets/gpux'.*Available options in 'targets':\s+cpu"):
        compose(["targets=gpux"], config_dir=ROOT / "conf")


def test_a_new_top_level_key_is_refused():
    with pytest.raises(KilnError, match=r"(?s)Could not override 'benchmarks.min_iters'.*'benchmarks' \(did you mean 'benchmark'\?\)"):
        compose(["benchmarks.min_iters=3"], config_dir=ROOT / "conf")


@pytest.mark.slow
def test_queued_sweep_show_and_metrics_diff(tmp_path, mini_built):
    # The mini target set built and its results committed, as a user would, so experiments start from them and
    # re-run only what they change.
    project = copy_project(mini_built, tmp_path)

    queued = run(["dvc", "exp", "run", "--queue", "-S", "targets.openvino.precision=fp32,int8"], project)
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout
    started = run(["dvc", "queue", "start", "-j", "1"], project)
    assert "Started" in started.stdout + started.stderr
    deadline = time.time() + 600
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, run(["dvc", "queue", "logs", status.split()[-4]], project, check=False).stdout

    shown = run(["dvc", "exp", "show", "--json"], project)
    rows = json.loads(shown.stdout)
    exps = [e for commit in rows for e in (commit.get("experiments") or [])]
    assert len(exps) == 2
    precisions, names = {}, []
    for exp in exps:
        data = exp["revs"][0]["data"]
        name = exp["revs"][0].get("name") or data["rev"]
        names.append(name)
        openvino = data["params"]["params.yaml"]["data"]["targets"]["openvino"]["precision"]
        metrics = data["metrics"]["reports/metrics/openvino.json"]["data"]
        # The headline columns, and only those: ms/image at the main batch, images/s, accuracy, served traffic,
        # throughput mode, GMAC/s, and what the engine costs.
        assert set(metrics) == {
            *("batch", "ms_per_image", "images_per_s", "ms_per_image_spread_pct", "top1_agreement", "served_images_per_s", "served_p99_ms"),
            *("throughput_images_per_s", "gmac_per_s", "peak_rss_mb", "engine_mb", "load_s", "first_infer_ms", "build_s"),
            *("max_rate_at_slo", "cost_per_million"),
        }
        precisions[openvino] = metrics
    assert set(precisions) == {"fp32", "int8"}
    assert precisions["fp32"]["top1_agreement"] == 1.0

    # kiln's short table: one row per experiment and target, the params that differ, the headline metrics.
    short = run(["python", "-m", "kiln", "experiments", "--target", "openvino"], project).stdout
    assert short.count("| openvino |") >= 3  # the workspace, the baseline commit and the two experiments
    assert all(f"| {name} |" in short for name in names)
    assert "targets.openvino.precision=int8" in short and "targets.openvino.precision=fp32" in short
    assert "targets.onnxruntime" not in short  # params equal in every row are left out
    assert "Changes are against each target's first row" in short and "±" in short  # each row's noise is shown

    diff = run(["dvc", "metrics", "diff", names[0], names[1], "--json"], project)
    changed = json.loads(diff.stdout)["reports/metrics/openvino.json"]
    assert {"ms_per_image", "images_per_s"} <= set(changed)
    assert all(significant(v["new"]) == v["new"] for v in changed.values() if isinstance(v.get("new"), float))
    assert stages_run(queued.stdout) == set()  # queued, not run in the workspace
